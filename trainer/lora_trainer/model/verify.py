"""Trusting a checkpoint read back from storage.

Whoever can write the output bucket can put anything there, so a checkpoint is used only when:
- its `COMPLETE` manifest parses (strict JSON) and lists every file with a SHA-256, each under a
  plain relative path (no `..`, no absolute path);
- exactly the listed files are downloaded, and each one hashes to its listed digest;
- everything is decoded without running code: safetensors for the adapter, JSON for state, and
  `torch.load(weights_only=True)` (tensors and plain containers only) for optimizer, scheduler and
  RNG states. A pickle that would build any other object is refused, never executed.

Anything else raises `CheckpointInvalid`; the caller falls back to an older checkpoint (or starts
fresh) and says so in the log and in progress.json. A checkpoint is decoded completely before any of
it is applied, so a half-valid one never leaves half its state in the model.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from ..io import strictjson
from ..io.storage import file_sha256

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class CheckpointInvalid(ValueError):
    """A checkpoint whose manifest, files or contents cannot be trusted."""


def strict_json(raw: bytes, where: str) -> Any:
    """Parse strict JSON (no NaN/Infinity); CheckpointInvalid naming `where` otherwise."""
    try:
        return strictjson.loads(raw)
    except ValueError as exc:
        raise CheckpointInvalid(f"{where}: not valid JSON ({exc})") from None


def safe_relpath(rel: str) -> bool:
    """A plain relative '/'-path: no empty, '.' or '..' parts, not absolute, no backslashes."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def parse_manifest(raw: bytes, where: str) -> dict:
    """The COMPLETE manifest: {"step": int, "files": {relpath: sha256 hex}, ...}."""
    data = strict_json(raw, where)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointInvalid(f"{where}: manifest lists no files")
    for rel, digest in files.items():
        if not safe_relpath(rel):
            raise CheckpointInvalid(f"{where}: unsafe file name {rel!r} in manifest")
        if not (isinstance(digest, str) and SHA256_HEX.match(digest)):
            raise CheckpointInvalid(f"{where}: no sha256 for {rel!r} in manifest")
    return data


def verify_files(local_dir: Path, manifest: dict, where: str) -> None:
    """Every listed file is present under `local_dir` with its digest, and nothing else is."""
    local_dir = Path(local_dir)
    listed = manifest["files"]
    present = {p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()}
    extra = sorted(present - set(listed))
    if extra:
        raise CheckpointInvalid(f"{where}: files not in the manifest: {', '.join(extra[:3])}")
    for rel, digest in sorted(listed.items()):
        path = local_dir / PurePosixPath(rel)
        if not path.is_file():
            raise CheckpointInvalid(f"{where}: {rel} is missing")
        actual = file_sha256(path)
        if actual != digest:
            raise CheckpointInvalid(f"{where}: {rel} has sha256 {actual[:12]}..., the manifest says "
                                    f"{digest[:12]}...")


def load_tensors(path: Path, where: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointInvalid(f"{where}: {Path(path).name} is not plain tensor data ({first[:200]})") from None
