"""Fixtures for trainer tests: one tiny base per session and a job factory on a local store."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import yaml
from overrides import with_overrides


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return tiny.make_tiny_base(tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from lora_trainer.model.loading import load_tokenizer

    return load_tokenizer(tiny_base)


def job_spec(base: Path, **over) -> dict:
    """A small bare spec: base at file://, data and output in the store's `data`/`out` buckets."""
    from lora_trainer.io.storage import fingerprint_dir

    spec = {
        "baseModel": {"uri": f"file://{base}", "revision": fingerprint_dir(base)},
        "dataset": {"train": "s3://data/train.jsonl"},
        "quantization": "none",
        "computeDtype": "float32",
        "lora": {"rank": 4, "dropout": 0.1, "targetModules": ["all-linear"]},
        "training": {"epochs": 2, "batchSize": 2, "learningRate": 0.005, "seed": 7,
                     "checkpointEverySteps": 2, "evalEverySteps": 2, "keepCheckpoints": 2},
        "output": {"uri": "s3://out/job"},
    }
    return with_overrides(spec, **over)


@pytest.fixture
def make_job(tmp_path, tiny_base):
    """make_job(n_train=24, manifest=True, **{'training.epochs': 1}) -> (config path, store dir)."""

    def make(n_train: int = 24, manifest: bool = True, **over):
        store = tmp_path / "store"
        tiny.make_chat_jsonl(store / "data" / "train.jsonl", n_train, seed=1)
        (store / "out").mkdir(exist_ok=True)  # the output bucket (a missing one fails the preflight)
        spec = job_spec(tiny_base, **over)
        doc = ({"apiVersion": "training.lora.dev/v1alpha1", "kind": "LoRATrainingJob",
                "metadata": {"name": "t", "namespace": "ns"}, "spec": spec} if manifest else spec)
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        return cfg, store

    return make
