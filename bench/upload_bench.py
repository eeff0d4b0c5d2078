"""Checkpoint upload to S3: the trainer's path vs plain `fput_object` of the same bytes, same run.

Ours = `checkpoint.upload` through `RetryingStore(S3Store)` (per-file puts, the COMPLETE marker with
file digests written last). Baseline = a loop of minio `fput_object` calls. Both go to the local
SeaweedFS of the dev control plane; the two are interleaved and the best of 3 is kept.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))


def fake_checkpoint(path: Path, mb: int = 64) -> int:
    """An adapter + optimizer-sized set of files of random bytes (incompressible)."""
    path.mkdir(parents=True, exist_ok=True)
    sizes = {"adapter/adapter_model.safetensors": mb // 4, "optimizer.pt": mb // 2, "scheduler.pt": 1,
             "rng.pt": 1, "state.json": 0}
    total = 0
    for name, size_mb in sizes.items():
        f = path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(max(size_mb * 2**20, 512))
        f.write_bytes(data)
        total += len(data)
    return total


def run(work: Path, mb: int = 64) -> dict:
    import localcluster
    from minio import Minio

    from lora_trainer.io.storage import RetryingStore, S3Store
    from lora_trainer.model import checkpoint as ckpt

    env = localcluster.read_s3_env(ROOT / ".local" / "s3.env")
    os.environ.update(env)
    client = Minio(env["S3_ENDPOINT"].split("://", 1)[1], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                   secure=False)
    bucket = "bench-upload"
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    local = work / "ckpt"
    size = fake_checkpoint(local, mb)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    store = RetryingStore(S3Store(client, bucket))
    best = {"ours": float("inf"), "baseline": float("inf")}
    for i in range(3):
        t0 = time.perf_counter()
        for f in files:
            client.fput_object(bucket, f"plain/{i}/{f.relative_to(local)}", str(f))
        best["baseline"] = min(best["baseline"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.upload(store, local, f"ours/{i}", i + 1)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name)
    mbps = {k: size / 2**20 / v for k, v in best.items()}
    ratio = mbps["ours"] / mbps["baseline"]
    return {"raw": {"bytes": size, "seconds": best},
            "figures": [{"figure": "checkpoint upload MB/s", "ours": mbps["ours"], "baseline": mbps["baseline"],
                         "ratio": ratio, "target": ">= 0.9", "met": ratio >= 0.9}]}
