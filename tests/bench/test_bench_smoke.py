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
