"""`lora-trainer`: run | train | evaluate | export CONFIG, and fingerprint PATH_OR_URI.

Exit codes: 0 done (Succeeded, or Rejected by the gate); 1 unexpected failure; 2 invalid input
(spec, data, unpinned or mismatching base, an output prefix of another job, unusable storage found
by the preflight, a key that escapes its store; retrying cannot help); 4 diverged (a non-finite
loss; the same spec diverges again); 143 preempted by SIGTERM (during training after a checkpoint;
during evaluation or export at once, leaving the published set as it was): the next attempt
resumes from the checkpoint, without retraining when training was done.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys

from .config import DATA_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, RuntimeConfig, load_job

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


def run_job(stages: set[str], job, rt: RuntimeConfig) -> int:
    """Run the stages; always leaves a final progress.json state and termination message."""
    from lora_operator.api import SpecError

    from . import stages as st
    from .data import DataError
    from .identity import ForeignPrefix
    from .model import RevisionError
    from .preflight import PreflightError
    from .progress import write_termination_message
    from .recipe import Diverged, LoRARecipe, Preempted, install_sigterm
    from .storage import StorageError, UnsafeKey

    recipe = LoRARecipe(job, rt)
    previous = install_sigterm(recipe)
    code, error = 0, None
    try:
        recipe.setup()
        if recipe.stop_requested:
            raise Preempted("stopped by SIGTERM before training started")
        if "train" in stages:
            recipe.train()
        state = "Succeeded"
        if recipe.rank0 and stages & {"evaluate", "export"}:
            signal.signal(signal.SIGTERM, _raise_preempted)  # no step boundary to wait for now
            state = _after_training(recipe, stages, st)
        recipe.progress.update(state=state, force=True)
    except Preempted as exc:
        code, error = PREEMPTED_EXIT_CODE, None
        log.warning("%s; exiting with %d so the next attempt resumes", exc, code)
        recipe.progress.update(state="Preempted", force=True)
    except (DataError, SpecError, RevisionError, ForeignPrefix, PreflightError, UnsafeKey) as exc:
        code, error = DATA_ERROR_EXIT_CODE, str(exc)
    except Diverged as exc:
        code, error = DIVERGED_EXIT_CODE, str(exc)
    except StorageError as exc:
        code, error = 1, str(exc)
    except Exception as exc:
        log.exception("trainer failed")
        code, error = 1, f"{type(exc).__name__}: {exc}"
    finally:
        if error is not None:
            log.error("%s", error)
            if hasattr(recipe, "progress"):
                recipe.progress.update(state="Failed", error=error, force=True)
        data = recipe.progress.data if hasattr(recipe, "progress") else {"state": "Failed",
                                                                          "error": error}
        if getattr(recipe, "rank0", True):
            write_termination_message(rt.termination_log, data)
        recipe.cleanup()
        signal.signal(signal.SIGTERM, previous)
    return code


def _raise_preempted(*_):
    from .recipe import Preempted

    raise Preempted("stopped by SIGTERM during evaluation or export; the published set is unchanged")


def _after_training(recipe, stages, st) -> str:
    # Free the training copy of the model before evaluation loads its own.
    del recipe.model, recipe.optimizer
    gc.collect()
    ctx = st.build_context(recipe.job, recipe.rt, recipe.progress, recipe.base_dir, recipe.data)
    report, passed = st.run_evaluate(ctx)
    if not passed:
        log.warning("the evaluation gate refused the adapter: %s; not publishing",
                    "; ".join(report.gate.reasons))
        return "Rejected"
    st.run_export(ctx, report)
    return "Succeeded"


def _stage_only(command: str, job, rt: RuntimeConfig) -> int:
    from . import stages as st

    ctx = st.build_context(job, rt)
    report, passed = st.run_evaluate(ctx)
    print("gate:", "passed" if passed else "refused: " + "; ".join(report.gate.reasons))
    if command == "export" and passed:
        print(json.dumps(st.run_export(ctx, report)))
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
        from .storage import fingerprint_uri

        print(fingerprint_uri(args.path, **rt.store_kwargs()))
        return 0
    from lora_operator.api import SpecError

    try:
        job = load_job(args.config)
    except SpecError as exc:
        print(f"lora-trainer: invalid config {args.config}: {exc}", file=sys.stderr)
        return DATA_ERROR_EXIT_CODE
    if args.command in ("evaluate", "export"):
        return _stage_only(args.command, job, rt)
    stages = {"run": {"train", "evaluate", "export"}, "train": {"train"}}[args.command]
    return run_job(stages, job, rt)


if __name__ == "__main__":
    sys.exit(main())
