"""Trust what ships, end to end on the tiny model: every case fails closed.

Each test is a way the promise "only an adapter that this job trained, and that passed its gate,
is published" used to break: a stubbed evaluator, a tampered checkpoint, another job's prefix, a
best step without a checkpoint, SIGTERM during export, a missing bucket, a NaN loss, a `..` key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import yaml
from tiny import run_trainer

from lora_operator.api import EXIT_DIVERGED, EXIT_INVALID_INPUT, EXIT_PREEMPTED
from lora_trainer.__main__ import run_job
from lora_trainer.config import RuntimeConfig, load_job
from lora_trainer.io.storage import LocalStore
from lora_trainer.model import checkpoint as ckpt

SHORT = {"training.epochs": 1, "training.checkpointEverySteps": 2, "training.evalEverySteps": 2}
ALL = ("train", "evaluate", "export")


def _rt(tmp_path, store, attempt=1) -> RuntimeConfig:
    return RuntimeConfig(work_dir=tmp_path / "work", storage_dir=store, progress_interval_s=0, attempt=attempt,
                         termination_log=tmp_path / "termination-log", progress_bar=False)


def _run(cfg, store, tmp_path, stages=("train",), attempt=1) -> int:
    return run_job(set(stages), load_job(cfg), _rt(tmp_path, store, attempt))


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))


def _progress(store) -> dict:
    return _strict(store / "out" / "job" / "progress.json")


def _out(store) -> LocalStore:
    return LocalStore(store / "out", uri_base="s3://out")


def _metadata(store):
    path = store / "out" / "job" / "lora-metadata.json"
    return _strict(path) if path.exists() else None


# --- 1. fail closed -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stubbed_out_evaluator_fails_the_run_and_publishes_nothing(make_job, tmp_path, monkeypatch):
    from lora_trainer import run

    cfg, store = make_job(n_train=8, **SHORT)
    monkeypatch.setattr(run, "evaluate", lambda ctx: None)  # a stub: no report, no verdict
    assert _run(cfg, store, tmp_path, ALL) == 1
    progress = _progress(store)
    assert progress["state"] == "Failed" and "verdict" in progress["error"]
    assert _metadata(store) is None and not (store / "out" / "job" / "published").exists()


# --- 2. checkpoints: verified, no code runs, job identity ------------------------------------------


def _tamper_with_payload(step_dir, marker, update_manifest: bool) -> None:
    """Replace optimizer.pt by a pickle that would write `marker` when unpickled."""
    import torch
    from trust_payload import WritesAFile

    torch.save({"state": {}, "param_groups": [], "x": WritesAFile(str(marker))}, step_dir / "optimizer.pt")
    if update_manifest:  # an attacker who can write the bucket can rewrite the manifest too
        manifest = json.loads((step_dir / "COMPLETE").read_text())
        manifest["files"]["optimizer.pt"] = ckpt.storage.file_sha256(step_dir / "optimizer.pt")
        (step_dir / "COMPLETE").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("update_manifest", [True, False], ids=["digest rewritten", "digest stale"])
def test_a_tampered_optimizer_state_runs_no_code_and_falls_back_to_an_older_checkpoint(
        make_job, tmp_path, update_manifest):
    cfg, store = make_job(n_train=12, **{**SHORT, "training.keepCheckpoints": 3, "training.batchSize": 1})
    assert _run(cfg, store, tmp_path / "a") == 0
    steps = [r.step for r in ckpt.list_checkpoints(_out(store), "job") if r.complete]
    assert len(steps) >= 2
    marker = tmp_path / "pwned"
    _tamper_with_payload(store / "out" / "job" / "checkpoints" / f"step-{steps[-1]}", marker, update_manifest)
    assert _run(cfg, store, tmp_path / "b", attempt=2) == 0
    assert not marker.exists(), "unpickling the checkpoint ran code"
    progress = _progress(store)
    assert [r["step"] for r in progress["rejectedCheckpoints"]] == [steps[-1]]
    assert progress["step"] == progress["totalSteps"]
    assert f"step-{steps[-1]}" in progress["lastCheckpoint"]


def _other_job(cfg, tmp_path, name="other", seed=None):
    doc = yaml.safe_load(cfg.read_text())
    doc["metadata"]["name"] = name
    if seed is not None:
        doc["spec"]["training"]["seed"] = seed
    other = tmp_path / f"{name}.yaml"
    other.write_text(yaml.safe_dump(doc))
    return other


@pytest.mark.slow
def test_a_second_job_on_the_same_prefix_is_refused_naming_the_prefix_and_the_other_job(make_job, tmp_path):
    cfg, store = make_job(n_train=8, **SHORT)
    assert _run(cfg, store, tmp_path / "a", ALL) == 0
    published = (store / "out" / "job" / "lora-metadata.json").read_bytes()
    other = _other_job(cfg, tmp_path)
    proc = run_trainer(tmp_path, "run", other, "--storage-dir", store, "--work-dir", tmp_path / "w")
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "s3://out/job" in last and "job ns/t" in last, last
    assert not (tmp_path / "w" / "base").exists(), "refused before downloading anything"
    assert (store / "out" / "job" / "lora-metadata.json").read_bytes() == published
    # The same name with other data or settings is not the same job either.
    changed = _other_job(cfg, tmp_path, name="t", seed=99)
    assert _run(changed, store, tmp_path / "c", ALL) == EXIT_INVALID_INPUT
    assert "different data or settings" in _progress(store)["error"]


# --- 3. the best checkpoint is real ---------------------------------------------------------------


@pytest.mark.slow
def test_a_best_eval_between_checkpoints_is_checkpointed_kept_and_published(make_job, tmp_path, monkeypatch):
    from lora_trainer.recipe import LoRARecipe

    cfg, store = make_job(n_train=24, **{"training.epochs": 1, "training.evalEverySteps": 3,
                                         "training.checkpointEverySteps": 4, "training.keepCheckpoints": 1})
    scripted = {3: 0.5}  # the best held-out loss is at step 3: an eval step, not a checkpoint step
    monkeypatch.setattr(LoRARecipe, "_heldout_loss", lambda self: scripted.get(self.step, 2.0 + self.step / 100))
    assert _run(cfg, store, tmp_path, ALL) == 0
    progress = _progress(store)
    assert progress["bestCheckpoint"] == "s3://out/job/checkpoints/step-3" and progress["bestEvalLoss"] == 0.5
    complete = [r.step for r in ckpt.list_checkpoints(_out(store), "job") if r.complete]
    assert 3 in complete and complete[-1] == progress["totalSteps"]
    meta = _metadata(store)
    assert meta["checkpointStep"] == 3 and meta["checkpointEvalLoss"] == 0.5


# --- 4. publishing is crash-safe ------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_export_keeps_the_previous_release_and_the_next_attempt_only_redoes_export(
        make_job, tmp_path, monkeypatch, caplog):
    from lora_trainer import export

    cfg, store = make_job(n_train=8, **SHORT)
    assert _run(cfg, store, tmp_path / "a", ALL) == 0
    first = _metadata(store)
    adapter = first["artifacts"]["adapter"].removeprefix("s3://out/")
    assert (store / "out" / adapter / "adapter_model.safetensors").exists()
    real_write = export.write_adapter

    def evicted(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # the pod is evicted while the adapter is written
        return real_write(*a, **kw)

    monkeypatch.setattr(export, "write_adapter", evicted)
    assert _run(cfg, store, tmp_path / "b", ALL, attempt=2) == EXIT_PREEMPTED
    assert _progress(store)["state"] == "Preempted"
    assert _metadata(store) == first and (store / "out" / adapter / "adapter_model.safetensors").exists()
    monkeypatch.setattr(export, "write_adapter", real_write)
    caplog.set_level(logging.INFO, logger="lora_trainer")
    assert _run(cfg, store, tmp_path / "c", ALL, attempt=3) == 0
    second, total = _metadata(store), _progress(store)["totalSteps"]
    assert second["release"] != first["release"] and second["runId"].endswith("-a3")
    assert _progress(store)["state"] == "Succeeded"
    assert f"resumed from s3://out/job/checkpoints/step-{total} at step {total}" in caplog.text, "no retraining"


# --- 5. preflight ---------------------------------------------------------------------------------


def test_a_missing_output_bucket_fails_with_exit_2_before_any_base_download(make_job, tmp_path, tiny_base):
    import shutil

    cfg, store = make_job(n_train=8, **{**SHORT, "output.uri": "s3://no-such-bucket/job"})
    shutil.copytree(tiny_base, store / "models" / "base")
    doc = yaml.safe_load(cfg.read_text())
    doc["spec"]["baseModel"]["uri"] = "s3://models/base"  # would be downloaded into the work dir
    cfg.write_text(yaml.safe_dump(doc))
    proc = run_trainer(tmp_path, "run", cfg, "--storage-dir", store, "--work-dir", tmp_path / "w")
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "s3://no-such-bucket/job" in last and "NoSuchBucket" in last, last
    assert not (tmp_path / "w" / "base").exists()
    assert not (store / "no-such-bucket").exists()


# --- 6. numbers are finite ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nan_loss_stops_training_with_its_own_exit_code_and_strict_json(make_job, tmp_path, monkeypatch):
    from lora_trainer.recipe import LoRARecipe

    cfg, store = make_job(n_train=12, **{**SHORT, "training.batchSize": 1})
    real = LoRARecipe._sum_ce
    monkeypatch.setattr(LoRARecipe, "_sum_ce",
                        lambda self, batch, *a: real(self, batch, *a) * (math.nan if self.step >= 1 else 1.0))
    assert _run(cfg, store, tmp_path, ALL) == EXIT_DIVERGED
    progress = _progress(store)  # strict: a bare NaN token fails here
    assert progress["state"] == "Failed" and "non-finite loss" in progress["error"] and "step 2" in progress["error"]
    assert progress["step"] == 1, "the diverged step is not counted as done"
    assert _metadata(store) is None


# --- 8. paths stay inside -------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3://out/../../../escaped", "pvc://claim/../../../etc/hostname",
                                 "s3://out/a/../../b", "s3://out//abs"])
def test_a_key_with_dot_dot_or_an_absolute_path_is_refused(tmp_path, uri):
    from lora_trainer.io import storage

    with pytest.raises(storage.UnsafeKey, match="not allowed"):
        storage.open_uri(uri, storage_dir=tmp_path / "store", pvc_root=tmp_path / "pvc")
    store = LocalStore(tmp_path / "root")
    for key in ("../x", "a/../../x", "/etc/hostname"):
        with pytest.raises(storage.UnsafeKey):
            store.put_bytes(key, b"x")
    assert not (tmp_path / "x").exists()


def test_the_cli_refuses_an_escaping_output_with_exit_2(make_job, tmp_path):
    cfg, store = make_job(n_train=8, **{**SHORT, "output.uri": "s3://out/../../../escaped"})
    proc = run_trainer(tmp_path, "train", cfg, "--storage-dir", store, "--work-dir", tmp_path / "w")
    assert proc.returncode == EXIT_INVALID_INPUT, proc.stderr[-2000:]
    assert "s3://out/../../../escaped" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()
