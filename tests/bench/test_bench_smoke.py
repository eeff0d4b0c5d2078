"""The prepared GPU benchmark must at least run its dry run here (it is never run in CI on a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_packed_rows_restart_position_ids_and_hold_no_padding():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_qlora

    rows = list(gpu_qlora.packed_batches([[5] * 3, [6] * 4, [7] * 6], seq_len=8))
    assert [r[1].tolist() for r in rows] == [[[0, 1, 2, 0, 1, 2, 3]], [[0, 1, 2, 3, 4, 5]]]
    assert sum(r[0].numel() for r in rows) == 13


@pytest.mark.slow
def test_gpu_script_dry_run_reports_both_recipes(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora.py"), "--dry-run", "--work",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for recipe in ("ours_packed", "baseline_padded"):
        assert report[recipe]["useful_tokens_per_s"] > 0 and report[recipe]["mfu"] > 0


@pytest.mark.slow
def test_gpu_script_memory_dry_run_reports_before_and_after(tmp_path):
    out = tmp_path / "mem.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora.py"), "--dry-run", "--memory", "--work",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["before"]["loss"] == pytest.approx(report["after"]["loss"], rel=1e-3)
    assert report["estimate"]["after"]["total_bytes"] < report["guide_budget_bytes"]


def test_7b_estimate_fits_the_guide_only_with_chunked_ce_and_checkpointing():
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_bench

    before = memory_bench.estimate_7b(4096, chunked=False, checkpointing=False)
    after = memory_bench.estimate_7b(4096)
    assert before["total_bytes"] > memory_bench.GUIDE_BUDGET_BYTES > after["total_bytes"]
    assert before["parts_bytes"]["logits"] > 6 * after["parts_bytes"]["logits"]


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_operator_bench_runs_jobs_to_succeeded_on_simulated_pods_and_counts_api_requests(cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import operator_bench

    result = operator_bench.run(tmp_path, sizes=(6,), window_s=4, idle_s=3)
    raw = result["raw"][0]
    assert raw["jobs_seen"] == 6 and raw["succeeded"] == 6, raw
    assert raw["window_all_training"] and raw["training_jobs"] == 1
    assert raw["arrival_per_s"] == operator_bench.RATE and raw["create_s"] >= 5 / operator_bench.RATE
    # where the operator's time went, from its own /metrics: every job's first pass in the urgent lane
    assert raw["profile"]["wait_urgent"]["count"] == 6 and raw["profile"]["pass"]["count"] >= 6, raw["profile"]
    # The operator may make no request at all in a 4 s window (it reads progress every 30 s and
    # GETs nothing per pass): check the counting itself on a request we make.
    assert raw["requests_per_job_min"] >= 0 and raw["operator_peak_rss_mb"] > 0
    assert raw["status_window_s"] <= 4 and raw["status_writes_max_per_job"] >= 0
    # who spent the CPU while the jobs arrived, and what they asked of the API server
    assert raw["cpu_arrival_s"]["operator"] > 0 and raw["cpu_arrival_s"]["kube-apiserver"] > 0, raw["cpu_arrival_s"]
    assert raw["requests_arrival_per_job"][f"POST/{operator_bench.PLURAL}"] >= 1.0, raw["requests_arrival_per_job"]
    before = operator_bench.request_counts()
    operator_bench.kubectl("get", "namespaces")
    after = operator_bench.request_counts()
    assert after[("LIST", "namespaces", "")] > before[("LIST", "namespaces", "")]
    # (idle PATCHes are counted cluster-wide: other test sessions' operators may patch meanwhile)
    assert any(f["figure"].startswith("apply->Job p95") for f in result["figures"])


@pytest.mark.slow
def test_gpu_script_trl_dry_run_reports_ours_and_trl_with_ratios(tmp_path):
    """The GPU comparison with TRL SFTTrainer runs end to end at tiny size on the CPU: both sides
    train their timed steps and the report carries tokens/s, MFU and the ratio."""
    out = tmp_path / "trl.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora.py"), "--trl", "--dry-run", "--work",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for side in ("ours", "trl"):
        assert report[side]["timed_steps"] == 2 and report[side]["timed_tokens"] > 0
        assert report[side]["tokens_per_s"] > 0 and report[side]["mfu"] > 0
    assert report["ratios"]["tokens_per_s"] == pytest.approx(
        report["ours"]["tokens_per_s"] / report["trl"]["tokens_per_s"])


def test_operator_bench_counts_status_writes_per_job_from_the_watch():
    """The per-interval figure: a changed status is a write, a repeated one (a re-list) is not,
    the create is not, and only writes inside the window of the jobs asked about count."""
    sys.path.insert(0, str(ROOT / "bench"))
    import operator_bench

    watcher = operator_bench.Watcher("ns")

    def seen(name, t, **status):
        watcher.saw_ltj({"metadata": {"name": name}, "status": status}, t)

    seen("a", 0.0)  # created
    seen("a", 1.0, phase="Training", progress={"step": 1})
    seen("a", 1.5, phase="Training", progress={"step": 1})  # a re-list: the same status
    seen("b", 2.0)
    seen("a", 20.0, phase="Training", progress={"step": 3})
    seen("b", 25.0, phase="Training", progress={"step": 2})
    seen("c", 26.0)
    seen("c", 27.0, phase="Succeeded")
    seen("a", 31.0, phase="Training", progress={"step": 5})  # after the window
    assert watcher.writes_between(1.0, 31.0, {"a", "b"}) == {"a": 2, "b": 1}
    assert watcher.writes_between(0.0, 100.0, {"a"}) == {"a": 3}
    assert watcher.succeeded == {"c": 27.0}
