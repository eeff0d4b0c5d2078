"""Checkpoints in object storage: `<output>/checkpoints/step-N/`.

Atomicity: every file of a checkpoint is uploaded first and the `COMPLETE` marker last (it lists
the files with their SHA-256). Readers ignore a step-N/ without COMPLETE, so a checkpoint is never
used or reported before it is whole. A partial step-N/ left by a killed attempt is deleted before
the same step is written again, and pruned once a later checkpoint is complete.

Retention: the latest `keep` complete checkpoints plus the best one by eval loss survive.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..io import storage

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


def upload(store, local_dir: Path, output_key: str, step: int) -> str:
    """Upload a local checkpoint dir as step-N (marker last); returns the key prefix."""
    key = storage.join(checkpoints_key(output_key), f"step-{step}")
    store.delete_prefix(key)  # leftovers of an attempt killed mid-upload
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != MARKER)
    manifest = {"step": step,
                "files": {p.relative_to(local_dir).as_posix(): storage.file_sha256(p) for p in files}}
    for p in files:
        store.put_file(storage.join(key, p.relative_to(local_dir).as_posix()), p)
    store.put_bytes(storage.join(key, MARKER), json.dumps(manifest, sort_keys=True).encode())
    return key


def download(store, ref: CheckpointRef, dest: Path) -> Path:
    if not ref.complete:
        raise ValueError(f"checkpoint {store.describe(ref.key)} is not complete")
    storage.download_prefix(store, ref.key, dest)
    return dest


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    (dest / "state.json").write_text(json.dumps(state, sort_keys=True, indent=1))
    return dest


def load_local(src: Path, model, optimizer, scheduler) -> dict:
    """Restore the adapter, optimizer and scheduler save_local wrote; returns state.json.
    RNG states are per rank: `restore_rng`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(src)
    weights = load_file(str(src / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint {src} has unexpected adapter keys: {unexpected[:3]}")
    optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(src / "scheduler.pt", weights_only=False))
    return json.loads((src / "state.json").read_text())


def restore_rng(src: Path, rank: int) -> bool:
    """Restore this rank's own RNG state; False when the checkpoint has none for it (a checkpoint
    written by fewer ranks), so the caller reseeds."""
    path = Path(src) / rng_file(rank)
    if not path.exists():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
