"""End-to-end training on the tiny model: golden losses, resume after SIGKILL, SIGTERM, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import run_trainer, trainer_cmd, trainer_env

from lora_operator.api import EXIT_PREEMPTED
from lora_trainer.__main__ import run_job
from lora_trainer.config import RuntimeConfig, load_job

GOLDEN = Path(__file__).parent / "golden" / "tiny_chat_losses.json"
# 48 examples -> 43 train examples packed into rows of up to maxSeqLength tokens, 4 rows per step:
# about a dozen steps/epoch.
GOLDEN_JOB = {"training.batchSize": 4, "training.epochs": 2, "training.checkpointEverySteps": 4,
              "training.evalEverySteps": 4}
TOL = 1e-4


def _in_process(cfg, store, tmp_path, stages=("train",)) -> int:
    rt = RuntimeConfig(work_dir=tmp_path / "work", storage_dir=store, progress_interval_s=0,
                       termination_log=tmp_path / "termination-log", progress_bar=False)
    return run_job(set(stages), load_job(cfg), rt)


def _progress(store) -> dict:
    return json.loads((store / "out" / "job" / "progress.json").read_text())


def _history(store) -> list[float]:
    """Per-step losses recorded in the latest complete checkpoint."""
    from lora_trainer.io.storage import LocalStore
    from lora_trainer.model import checkpoint as ckpt

    s = LocalStore(store / "out")
    ref = ckpt.latest_complete(s, "job")
    state = json.loads(s.get_bytes(f"{ref.key}/state.json"))
    return [h["loss"] for h in state["history"]]


@pytest.mark.slow
def test_fixed_seed_two_epoch_run_reproduces_the_golden_losses(make_job, tmp_path):
    cfg, store = make_job(n_train=48, **GOLDEN_JOB)
    assert _in_process(cfg, store, tmp_path) == 0
    progress, losses = _progress(store), _history(store)
    got = {"losses": losses, "evalLoss": progress["evalLoss"], "totalSteps": progress["totalSteps"]}
    if os.environ.get("LORA_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got["totalSteps"] == want["totalSteps"] == len(losses)
    assert losses == pytest.approx(want["losses"], abs=TOL)
    assert got["evalLoss"] == pytest.approx(want["evalLoss"], abs=TOL)
    assert losses[-1] < losses[0]
    metrics = [json.loads(line) for line in (store / "out" / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == losses, "metrics.jsonl should hold every step's loss"
    assert metrics[-1]["evalLoss"] == pytest.approx(got["evalLoss"], abs=TOL)
    assert progress["state"] == "Succeeded" and progress["step"] == want["totalSteps"]
    assert progress["trainableParams"] > 0 and progress["tokensPerSecond"] > 0
    assert progress["datasetHashes"]["s3://data/train.jsonl"].startswith("sha256:")
    print(f"tokens/s {progress['tokensPerSecond']}, peak memory {progress['peakMemoryBytes']}")


def _wait_for(pred, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"trainer exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_uninterrupted_losses(make_job, tmp_path):
    cfg, store = make_job(n_train=48, **GOLDEN_JOB)
    cmd = trainer_cmd("train", str(cfg), "--storage-dir", str(store), "--work-dir", str(tmp_path / "w"))
    marker = store / "out" / "job" / "checkpoints" / "step-4" / "COMPLETE"
    proc = subprocess.Popen(cmd, env=trainer_env(tmp_path), stderr=subprocess.DEVNULL)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _progress(store)["step"] < json.loads(GOLDEN.read_text())["totalSteps"]
    done = subprocess.run(cmd, env=trainer_env(tmp_path, LORA_ATTEMPT="2"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from s3://out/job/checkpoints/step-" in done.stderr
    want = json.loads(GOLDEN.read_text())
    assert _history(store) == pytest.approx(want["losses"], abs=TOL)
    progress = _progress(store)
    assert progress["attempt"] == 2 and progress["evalLoss"] == pytest.approx(want["evalLoss"], abs=TOL)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_preempted(make_job, tmp_path):
    cfg, store = make_job(n_train=48, **{**GOLDEN_JOB, "training.checkpointEverySteps": 1000})
    cmd = trainer_cmd("train", str(cfg), "--storage-dir", str(store), "--work-dir", str(tmp_path / "w"))
    proc = subprocess.Popen(cmd, env=trainer_env(tmp_path), stderr=subprocess.PIPE, text=True)
    progress_file = store / "out" / "job" / "progress.json"
    _wait_for(lambda: progress_file.exists() and _progress(store)["step"] >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    progress = _progress(store)
    assert progress["state"] == "Preempted"
    assert progress["lastCheckpoint"] == f"s3://out/job/checkpoints/step-{progress['step']}"
    assert (store / "out" / "job" / "checkpoints" / f"step-{progress['step']}" / "COMPLETE").exists()
    assert json.loads((tmp_path / "termination-log").read_text())["state"] == "Preempted"


def test_bad_data_fails_with_one_line_naming_file_and_line(make_job, tmp_path):
    cfg, store = make_job(n_train=4)
    train = store / "data" / "train.jsonl"
    train.write_text(train.read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    proc = run_trainer(tmp_path, "train", cfg, "--storage-dir", store, "--work-dir", tmp_path / "w")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "s3://data/train.jsonl:5: messages[0]: unknown role 'robot'" in proc.stderr.splitlines()[-1]
    progress = _progress(store)
    assert progress["state"] == "Failed" and "train.jsonl:5" in progress["error"]


def test_fingerprint_cli_prints_the_content_hash(tiny_base, tmp_path):
    from lora_trainer.io.storage import fingerprint_dir

    proc = run_trainer(tmp_path, "fingerprint", f"file://{tiny_base}", timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == fingerprint_dir(tiny_base)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(make_job, tmp_path):
    over = {"training.epochs": 1, "lora.dropout": 0.0, "training.checkpointEverySteps": 100,
            "training.evalEverySteps": 2}  # held-out loss mid-run: ranks hold unequal shares of it
    cfg, store = make_job(n_train=24, **over, **{"training.batchSize": 2})
    assert _in_process(cfg, store, tmp_path / "one") == 0
    single = _history(store)
    store.rename(tmp_path / "store1")  # a separate prefix: this is another job's output
    cfg, store2 = make_job(n_train=24, **over, **{"training.batchSize": 1})
    store2 = store2.rename(tmp_path / "store2")
    with socket.socket() as sock:  # a free port: other sessions may run this test at the same time
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "lora_trainer",
           "train", str(cfg), "--storage-dir", str(store2), "--work-dir", str(tmp_path / "w2")]
    proc = subprocess.run(cmd, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _history(store2) == pytest.approx(single, abs=1e-4)
    assert "rank 1 of world size 2" in proc.stderr
    assert (_progress(store2)["rank"], _progress(store2)["worldSize"]) == (0, 2)


@pytest.mark.slow
def test_run_trains_evaluates_and_publishes(make_job, tmp_path):
    cfg, store = make_job(n_train=16, **{"training.epochs": 1, "quantization": "nf4"})
    assert _in_process(cfg, store, tmp_path, stages=("train", "evaluate", "export")) == 0
    progress = _progress(store)
    assert progress["state"] == "Succeeded" and progress["eval"]["verdict"] == "Passed"
    assert progress["artifacts"]["adapter"].startswith("s3://out/job/published/t-a1-")
    meta = json.loads((store / "out" / "job" / "lora-metadata.json").read_text())
    assert meta["artifacts"] == progress["artifacts"] and meta["job"]["name"] == "t"
    assert json.loads((tmp_path / "termination-log").read_text())["state"] == "Succeeded"


@pytest.mark.slow
def test_a_rendezvous_no_peer_joins_fails_within_its_timeout_naming_the_cause(tmp_path):
    cmd = [sys.executable, "-m", "lora_trainer.launch", "--nnodes", "2", "--node_rank", "0",
           "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", "29578",
           "--rdzv_conf", "timeout=2", "--max_restarts", "0", "-m", "lora_trainer", "run", "unused.yaml"]
    proc = subprocess.run(cmd, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["state"] == "Failed"
    assert "rendezvous of node rank 0 of 2 at 127.0.0.1:29578 failed" in summary["error"]
    assert "1/2 clients joined" in summary["error"]
