"""Evaluating on the model training left in memory gives the numbers of the reload path
(`lora-trainer evaluate` on the same checkpoint), also when the trained weights moved past the
best checkpoint; and a second evaluation of the same run reuses the base's results."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from lora_trainer import run as running
from lora_trainer.config import RuntimeConfig, load_job
from lora_trainer.evaluation import in_memory, scoring


def _rt(tmp_path, store, name: str) -> RuntimeConfig:
    return RuntimeConfig(work_dir=tmp_path / name, storage_dir=store, progress_interval_s=0,
                         termination_log=tmp_path / "termination-log", progress_bar=False)


@pytest.mark.slow
def test_in_memory_evaluation_equals_the_reload_path(make_job, tmp_path, monkeypatch, caplog):
    cfg, store = make_job(n_train=16, **{"training.epochs": 1, "quantization": "nf4"})
    job = load_job(cfg)
    adopted, loads = [], []
    real_adopt, real_load = in_memory.adopt, scoring.load_adapted

    def drifted_adopt(model, adapter_dir, spec):
        with torch.no_grad():  # as if training had moved on past the best checkpoint
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)
        adopted.append(real_adopt(model, adapter_dir, spec))
        return adopted[-1]

    def counted_load(*a, **kw):
        loads.append(1)
        return real_load(*a, **kw)

    monkeypatch.setattr(in_memory, "adopt", drifted_adopt)
    monkeypatch.setattr(scoring, "load_adapted", counted_load)
    with caplog.at_level(logging.INFO):
        assert running.run(job, _rt(tmp_path, store, "work"), frozenset({"train", "evaluate"})) in (
            "Succeeded", "Rejected")
    assert adopted and adopted[0] is not None and not loads, "training's model must be reused"
    in_mem = json.loads((store / "out" / "job" / "eval.json").read_text())

    shutil.rmtree(store / "out" / "job" / "cache")  # measure the base again on the reload path
    report, _ = running.run_after_training(job, _rt(tmp_path, store, "work2"), publish=False)
    assert loads == [1]
    assert report.adapter.loss == pytest.approx(in_mem["adapter"]["loss"], rel=1e-5)
    assert report.base.loss == pytest.approx(in_mem["base"]["loss"], rel=1e-5)
    assert report.adapter.tokens == in_mem["adapter"]["tokens"]
    assert report.checkpoint_step == in_mem["checkpointStep"]


@pytest.mark.slow
def test_a_rerun_of_evaluate_reuses_the_cached_base(make_job, tmp_path, monkeypatch):
    cfg, store = make_job(n_train=16, **{"training.epochs": 1})
    job = load_job(cfg)
    running.run(job, _rt(tmp_path, store, "work"), frozenset({"train", "evaluate"}))
    first = json.loads((store / "out" / "job" / "eval.json").read_text())
    assert list((store / "out" / "job" / "cache").glob("base-eval-*.result.json"))
    assert list((store / "out" / "job" / "cache").glob("tokens-*.safetensors"))
    calls = []
    real = scoring._score_base
    monkeypatch.setattr(scoring, "_score_base", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    report, _ = running.run_after_training(job, _rt(tmp_path, store, "fresh-pod"), publish=False)
    assert not calls, "the base must come from <output>/cache on a new pod"
    assert report.base.loss == first["base"]["loss"]
    assert report.adapter.loss == pytest.approx(first["adapter"]["loss"], rel=1e-5)
