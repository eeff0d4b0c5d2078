"""`lora-trainer`: run | train | evaluate | export | inspect CONFIG, and fingerprint PATH_OR_URI.

This module only parses arguments and maps exceptions to exit codes; the run order is `run.py`.

Exit codes: 0 done (Succeeded, or Rejected by the gate); 1 unexpected failure; 2 invalid input
(spec, data, unpinned or mismatching base, an output prefix of another job, storage the preflight
found unusable, a key that escapes its store; retrying cannot help); 4 diverged (a non-finite loss:
the same spec diverges again); 143 preempted by SIGTERM (during training after a checkpoint; during
evaluation or export at once, the published set unchanged): the next attempt resumes from the
checkpoint, without retraining when training was done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Set as AbstractSet

from lora_operator.api import SpecError

from .config import DATA_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, RuntimeConfig, load_job
from .io.storage import fingerprint_uri
from .recipe import Diverged, Preempted
from .run import INVALID_INPUT, KNOWN_FAILURES, RUN, TRAIN, error_message, inspect_job, run, run_after_training

log = logging.getLogger("lora_trainer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-trainer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "prepare data, train, evaluate, export"),
                        ("train", "prepare data and train (resumes from the latest checkpoint)"),
                        ("evaluate", "evaluate the best checkpoint"),
                        ("export", "publish the best checkpoint")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="LoRATrainingJob manifest or bare spec (YAML)")
        _runtime_flags(s)
    i = sub.add_parser("inspect", help="show how each example will be trained (trained tokens marked)")
    i.add_argument("config", help="LoRATrainingJob manifest or bare spec (YAML)")
    i.add_argument("--limit", type=int, default=None, help="print at most N examples (the summary counts all)")
    i.add_argument("--json", action="store_true", help="one JSON object per example, then a summary")
    _runtime_flags(i)
    f = sub.add_parser("fingerprint", help="print sha256:<hex> of a model directory or URI")
    f.add_argument("path", help="local path, file://, pvc:// or s3:// URI")
    _runtime_flags(f)
    return p


def _runtime_flags(p) -> None:
    p.add_argument("--storage-dir", help="local directory as object store (s3://b/k -> DIR/b/k)")
    p.add_argument("--work-dir", help="local scratch directory")
    p.add_argument("--progress-interval", type=float, dest="progress_interval_s",
                   help="seconds between progress.json writes")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_const", const=False)


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "accelerate", "peft", "bitsandbytes", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run_job(stages: AbstractSet[str], job, rt: RuntimeConfig) -> int:
    """`run`/`train`: the stages of run.run; the exit code says whether a retry can help."""
    try:
        run(job, rt, frozenset(stages))
    except Exception as exc:
        return exit_code(exc)
    return 0


def after_training(command: str, job, rt: RuntimeConfig) -> int:
    """`evaluate`/`export` on the best checkpoint of a finished run."""
    try:
        report, uris = run_after_training(job, rt, publish=command == "export")
    except Exception as exc:
        return exit_code(exc)
    print("gate:", "passed" if report.gate.passed else "refused: " + "; ".join(report.gate.reasons))
    if uris is not None:
        print(json.dumps(uris))
    return 0


def exit_code(exc: Exception) -> int:
    """Log `exc` and map it to the exit code (module docstring)."""
    if isinstance(exc, Preempted):
        log.warning("%s; exiting with %d so the next attempt resumes", exc, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    if not isinstance(exc, KNOWN_FAILURES):
        log.error("trainer failed", exc_info=exc)
    log.error("%s", error_message(exc))
    if isinstance(exc, Diverged):
        return DIVERGED_EXIT_CODE
    return DATA_ERROR_EXIT_CODE if isinstance(exc, INVALID_INPUT) else 1


def inspect(job, rt: RuntimeConfig, limit, as_json: bool) -> int:
    """`inspect`: the prepare stage alone, printed; invalid data exits 2 as in training."""
    try:
        inspect_job(job, rt, limit=limit, as_json=as_json)
    except Exception as exc:
        print(f"lora-trainer: {error_message(exc)}", file=sys.stderr)
        return exit_code(exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    args = _parser().parse_args(argv)
    rt = RuntimeConfig.from_env(storage_dir=args.storage_dir, work_dir=args.work_dir,
                                progress_interval_s=args.progress_interval_s,
                                progress_bar=args.progress_bar)
    if args.command == "fingerprint":
        print(fingerprint_uri(args.path, **rt.store_kwargs()))
        return 0
    try:
        job = load_job(args.config)
    except SpecError as exc:
        print(f"lora-trainer: invalid config {args.config}: {exc}", file=sys.stderr)
        return DATA_ERROR_EXIT_CODE
    if args.command in ("evaluate", "export"):
        return after_training(args.command, job, rt)
    if args.command == "inspect":
        return inspect(job, rt, args.limit, args.json)
    return run_job({"run": RUN, "train": TRAIN}[args.command], job, rt)


if __name__ == "__main__":
    sys.exit(main())
