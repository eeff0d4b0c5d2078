"""The champion reaches the trainer: resolved by the operator into job.yaml, fetched before scoring."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_trainer.config import RuntimeConfig, load_job
from lora_trainer.run import StageContext, _fetch_champion

SPEC = {"baseModel": {"uri": "s3://models/base", "revision": "sha256:" + "0" * 64},
        "dataset": {"train": "s3://team/train.jsonl"}, "output": {"uri": "s3://team/runs/v2"},
        "evaluation": {"gate": {"champion": {"channel": "production"}}}}
CHAMPION = {"channel": "production", "runId": "run-v1", "jobName": "v1", "adapter": "s3://team/runs/v1/adapter"}


def _job(tmp_path: Path, champion=CHAMPION, spec=SPEC):
    manifest = {"apiVersion": "training.lora.dev/v1alpha1", "kind": "LoRATrainingJob",
                "metadata": {"name": "v2", "namespace": "team"}, "spec": spec}
    if champion is not None:
        manifest["champion"] = champion
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return load_job(path)


def _context(tmp_path: Path, job) -> StageContext:
    rt = RuntimeConfig(work_dir=tmp_path / "work", storage_dir=tmp_path / "store")
    return StageContext(job, rt, tmp_path / "base", tmp_path / "adapter", None, tmp_path / "heldout.jsonl", None, "")


def test_should_read_the_champion_the_operator_resolved(tmp_path):
    job = _job(tmp_path)
    assert job.champion == CHAMPION and job.name == "v2"
    assert _job(tmp_path, champion=None).champion is None


def test_should_download_the_champion_adapter_before_scoring(tmp_path):
    stored = tmp_path / "store" / "team" / "runs" / "v1" / "adapter"
    stored.mkdir(parents=True)
    (stored / "adapter_config.json").write_text('{"r": 8}')
    (stored / "adapter_model.safetensors").write_bytes(b"weights")
    (stored / "adapter_model.bin").write_bytes(b"a pickle that must never be loaded")
    local = _fetch_champion(_context(tmp_path, _job(tmp_path)))
    assert (local / "adapter_config.json").read_text() == '{"r": 8}'
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_should_fail_when_the_resolved_champion_cannot_be_read(tmp_path):
    from lora_trainer.io.storage import StorageError

    with pytest.raises(StorageError, match="adapter_config.json"):
        _fetch_champion(_context(tmp_path, _job(tmp_path)))


def test_should_fetch_nothing_without_a_comparable_champion_or_a_champion_gate(tmp_path):
    missing = {"channel": "production", "missing": "channel production serves no adapter yet"}
    assert _fetch_champion(_context(tmp_path, _job(tmp_path, champion=missing))) is None
    no_gate = {**SPEC, "evaluation": {}}
    assert _fetch_champion(_context(tmp_path, _job(tmp_path, spec=no_gate))) is None


def _run(cfg, store, tmp_path, name):
    from lora_trainer.__main__ import run_job

    rt = RuntimeConfig(work_dir=tmp_path / f"work-{name}", storage_dir=store, progress_interval_s=0,
                       termination_log=tmp_path / f"termination-{name}", progress_bar=False)
    return run_job({"train", "evaluate", "export"}, load_job(cfg), rt)


@pytest.mark.slow
def test_should_reject_a_second_run_worse_than_the_published_champion_end_to_end(make_job, tmp_path):
    import json

    cfg, store = make_job(n_train=24, **{"training.epochs": 1, "output.uri": "s3://out/v1"})
    assert _run(cfg, store, tmp_path, "v1") == 0
    v1_meta = json.loads((store / "out" / "v1" / "lora-metadata.json").read_text())
    doc = yaml.safe_load(cfg.read_text())
    doc["spec"]["output"]["uri"] = "s3://out/v2"
    doc["spec"]["training"] = {**doc["spec"]["training"], "maxSteps": 1}  # a barely trained challenger
    doc["spec"]["evaluation"] = {"gate": {"champion": {"channel": "production"}}}
    doc["champion"] = {"channel": "production", "runId": v1_meta["runId"], "adapter": v1_meta["artifacts"]["adapter"]}
    cfg.write_text(yaml.safe_dump(doc))
    assert _run(cfg, store, tmp_path, "v2") == 0  # Rejected is a clean exit
    report = json.loads((store / "out" / "v2" / "eval.json").read_text())
    assert report["champion"]["runId"] == v1_meta["runId"]
    assert report["champion"]["loss"]["loss"] == pytest.approx(v1_meta["eval"]["adapter"]["loss"], rel=1e-5), \
        "the champion re-scored on the same data gives its own published held-out loss"
    assert report["gate"]["verdict"] == "Failed" and report["gate"]["reasons"][0].startswith("championLoss: ")
    assert not (store / "out" / "v2" / "lora-metadata.json").exists(), "nothing published"
