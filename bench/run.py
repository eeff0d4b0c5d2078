"""`make bench`: run the CPU benchmarks, print one table, write bench/results/<name>.json.

    python bench/run.py                 # trainer, upload, operator (N = 50, 500, 1000, 2000)
    python bench/run.py --quick         # operator N = 50 only
    python bench/run.py --only trainer  # one of: trainer, trl, upload, operator
    python bench/run.py --only trl --quick
                                        # ours vs TRL SFTTrainer, 96 examples, one pair of runs
    python bench/run.py --only operator --sizes 50,1000 --baseline-ref 2771ff8
                                        # the scale series, and an earlier operator at N = 1000

The operator suite runs on simulated pods (hack/podrunner.py --simulate); see operator_bench.py.

Every figure is a ratio against a baseline measured in the same run on the same machine, except
the operator's latencies and RSS, whose targets are absolute. GPU figures: bench/gpu_qlora.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import operator_bench  # noqa: E402
import trainer_bench  # noqa: E402
import trl_bench  # noqa: E402
import upload_bench  # noqa: E402


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    print(f"{'figure':<58} {'ours':>10} {'baseline':>10} {'ratio':>7}  {'target':<12} met")
    for r in rows:
        print(f"{r['figure']:<58} {_fmt(r['ours']):>10} {_fmt(r['baseline']):>10} {_fmt(r['ratio']):>7}  "
              f"{r['target']:<12} {_fmt(r['met'])}")


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="operator N = 50 only; TRL comparison on 96 examples, one pair of runs")
    parser.add_argument("--sizes", default="50,500,1000,2000", help="operator N series (comma list)")
    parser.add_argument("--baseline-ref", help="also run this git ref's operator (before/after, same run)")
    parser.add_argument("--baseline-sizes", default="500",
                        help="N series for --baseline-ref (d361065 finishes 500 jobs in minutes)")
    parser.add_argument("--window-s", type=float, default=60.0,
                        help="operator: seconds of API traffic counted while jobs train")
    parser.add_argument("--idle-s", type=float, default=35.0,
                        help="operator: idle window (0 status PATCHes); above the 30 s resync interval")
    parser.add_argument("--rate", type=float, default=operator_bench.RATE,
                        help="operator: LoRATrainingJobs sent per second (fixed arrival)")
    parser.add_argument("--trl-rounds", type=int, default=3,
                        help="pairs of runs (ours, TRL) in the TRL comparison; medians are reported")
    parser.add_argument("--only", choices=["trainer", "trl", "upload", "operator"])
    args = parser.parse_args()
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    needs_cluster = args.only in (None, "upload", "operator")
    if needs_cluster:
        subprocess.run([sys.executable, str(HERE.parent / "hack" / "localcluster.py"), "up"], check=True)
    suites = {
        "trainer": lambda: trainer_bench.run(work / "trainer"),
        "trl": lambda: trl_bench.run(work / "trl", n_train=96 if args.quick else 1080,
                                     rounds=1 if args.quick else args.trl_rounds),
        "upload": lambda: upload_bench.run(work / "upload"),
        "operator": lambda: operator_bench.run(
            work / "operator", (50,) if args.quick else _sizes(args.sizes), args.baseline_ref,
            _sizes(args.baseline_sizes), window_s=args.window_s, idle_s=args.idle_s, rate=args.rate),
    }
    rows = []
    for name, fn in suites.items():
        if args.only and name != args.only:
            continue
        print(f"==> {name}", flush=True)
        result = {"machine": machine(), **fn()}
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        rows.extend(result["figures"])
    print()
    print(f"machine: {machine()}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
