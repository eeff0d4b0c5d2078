"""Checkpoints in object storage: `<output>/checkpoints/step-N/`.

Atomicity: every file of a checkpoint is uploaded first and the `COMPLETE` marker last (it lists
the files with their SHA-256). Readers ignore a step-N/ without COMPLETE, so a checkpoint is never
used or reported before it is whole. A partial step-N/ left by a killed attempt is deleted before
the same step is written again, and pruned once a later checkpoint is complete.

Retention: the latest `keep` complete checkpoints plus the best one by eval loss survive.

Trust (verify.py): the manifest also records the step's held-out loss and the job identity
(identity.py). A checkpoint is read back by downloading exactly the files its manifest lists and
checking each digest (`fetch_verified`), and decoded without running code (`load_local`: safetensors,
JSON, and tensors-only `torch.load`); RNG states are stored as tensors and plain lists for that.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch

from ..io import storage, strictjson
from .verify import CheckpointInvalid, load_tensors, parse_manifest, strict_json, verify_files

MARKER = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    key: str  # key prefix of step-N in the store
    complete: bool


def checkpoints_key(output_key: str) -> str:
    return storage.join(output_key, "checkpoints")


def list_checkpoints(store, output_key: str) -> list[CheckpointRef]:
    """All step-N/ prefixes, oldest first, with whether their COMPLETE marker exists."""
    root = checkpoints_key(output_key)
    found: dict[int, bool] = {}
    for key in store.list(root):
        rel = key[len(root):].lstrip("/").split("/")
        m = STEP_RE.match(rel[0]) if len(rel) >= 2 else None
        if m:
            step = int(m.group(1))
            found[step] = found.get(step, False) or rel[1:] == [MARKER]
    return [CheckpointRef(s, storage.join(root, f"step-{s}"), c) for s, c in sorted(found.items())]


def latest_complete(store, output_key: str) -> Optional[CheckpointRef]:
    done = [c for c in list_checkpoints(store, output_key) if c.complete]
    return done[-1] if done else None


def upload(store, local_dir: Path, output_key: str, step: int, extra: Optional[dict] = None) -> str:
    """Upload a local checkpoint dir as step-N (marker last); returns the key prefix.

    `extra` goes into the manifest: `evalLoss` and the job identity (`job`, `fingerprint`).
    """
    key = storage.join(checkpoints_key(output_key), f"step-{step}")
    store.delete_prefix(key)  # leftovers of an attempt killed mid-upload
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != MARKER)
    manifest = {**(extra or {}), "step": step,
                "files": {p.relative_to(local_dir).as_posix(): storage.file_sha256(p) for p in files}}
    for p in files:
        store.put_file(storage.join(key, p.relative_to(local_dir).as_posix()), p)
    store.put_bytes(storage.join(key, MARKER), strictjson.dump_bytes(manifest, sort_keys=True))
    return key


def read_manifest(store, ref: CheckpointRef) -> dict:
    """The parsed COMPLETE manifest of `ref` (CheckpointInvalid when it cannot be trusted)."""
    where = store.describe(storage.join(ref.key, MARKER))
    manifest = parse_manifest(store.get_bytes(storage.join(ref.key, MARKER)), where)
    if manifest.get("step") != ref.step:
        raise CheckpointInvalid(f"{where}: manifest is for step {manifest.get('step')}, not {ref.step}")
    return manifest


def fetch_verified(store, ref: CheckpointRef, dest: Path, manifest: dict, only: str = "") -> Path:
    """Download exactly the files `manifest` lists (those under `only`, when given) into a fresh
    `dest` and check every digest."""
    import shutil

    if not ref.complete:
        raise CheckpointInvalid(f"checkpoint {store.describe(ref.key)} is not complete")
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    manifest = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k.startswith(only)}}
    if not manifest["files"]:
        raise CheckpointInvalid(f"{store.describe(ref.key)}: manifest lists nothing under {only!r}")
    for rel in sorted(manifest["files"]):
        try:
            store.get_file(storage.join(ref.key, rel), dest / PurePosixPath(rel))
        except storage.NotFound:
            raise CheckpointInvalid(f"{store.describe(ref.key)}: {rel} is listed but missing") from None
    verify_files(dest, manifest, store.describe(ref.key))
    return dest


def complete_newest_first(store, output_key: str) -> list[CheckpointRef]:
    return [r for r in reversed(list_checkpoints(store, output_key)) if r.complete]


def prune(store, output_key: str, keep: int, best_step: Optional[int]) -> list[int]:
    """Delete all but the latest `keep` complete checkpoints and the best; returns deleted steps.

    Incomplete ones older than the latest complete checkpoint are deleted too.
    """
    refs = list_checkpoints(store, output_key)
    complete = [r.step for r in refs if r.complete]
    keep_steps = set(complete[-keep:]) | ({best_step} if best_step is not None else set())
    newest = complete[-1] if complete else -1
    deleted = []
    for ref in refs:
        stale_partial = not ref.complete and ref.step < newest
        if (ref.complete and ref.step not in keep_steps) or stale_partial:
            store.delete_prefix(ref.key)
            deleted.append(ref.step)
    return deleted


# --- local state ----------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG state as tensors, ints and lists, so `torch.load(weights_only=True)` reads it."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "hasGauss": int(has_gauss), "cachedGaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["hasGauss"],
                         n["cachedGaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    """Rank 0's RNG state is rng.pt (as in single-process checkpoints); rank k's is rng-rank-k.pt."""
    return "rng.pt" if rank == 0 else f"rng-rank-{rank}.pt"


def save_local(dest: Path, model, optimizer, scheduler, state: dict,
               rng_states: Optional[list[dict]] = None) -> Path:
    """Adapter weights (PEFT format), optimizer, scheduler, the RNG state of every rank
    (`rng_states[k]` of rank k; default: this process's) and `state.json`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest / "adapter"), safe_serialization=True)
    torch.save(optimizer.state_dict(), dest / "optimizer.pt")
    torch.save(scheduler.state_dict(), dest / "scheduler.pt")
    for rank, rng in enumerate(rng_states or [rng_state()]):
        torch.save(rng, dest / rng_file(rank))
    (dest / "state.json").write_text(strictjson.dumps(state, sort_keys=True, indent=1))
    return dest


def load_local(src: Path, model, optimizer, scheduler, where: Optional[str] = None) -> dict:
    """Restore what save_local wrote (rank 0's RNG state; other ranks then `restore_rng`);
    returns state.json.

    Everything is decoded before anything is applied, and nothing is unpickled but tensors and
    plain containers: a bad file raises CheckpointInvalid and leaves model and optimizer untouched.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(src)
    where = where or str(src)
    try:
        weights = load_file(str(src / "adapter" / "adapter_model.safetensors"))
    except Exception as exc:
        raise CheckpointInvalid(f"{where}: adapter weights unreadable ({type(exc).__name__})") from None
    opt, sched, rng = (load_tensors(src / name, where) for name in ("optimizer.pt", "scheduler.pt", "rng.pt"))
    state = strict_json((src / "state.json").read_bytes(), f"{where}/state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointInvalid(f"{where}/state.json: no step")
    try:
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise CheckpointInvalid(f"{where}: unexpected adapter keys {unexpected[:3]}")
        optimizer.load_state_dict(opt)
        scheduler.load_state_dict(sched)
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointInvalid):
            raise
        raise CheckpointInvalid(f"{where}: state does not fit this model ({type(exc).__name__}: {exc})") from None
    return state


def restore_rng(src: Path, rank: int, where: Optional[str] = None) -> bool:
    """Restore this rank's own RNG state (after load_local); False when the checkpoint has none
    for it (written by fewer ranks), so the caller reseeds."""
    path = Path(src) / rng_file(rank)
    if rank == 0 or not path.exists():
        return rank == 0
    try:
        set_rng_state(load_tensors(path, where or str(src)))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointInvalid):
            raise
        raise CheckpointInvalid(f"{where or src}: {path.name} unusable ({type(exc).__name__})") from None
    return True
