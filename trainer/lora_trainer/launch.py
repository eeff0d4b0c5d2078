"""`python -m lora_trainer.launch <torchrun arguments>`: torchrun for multi-node pods, exit codes kept.

torchrun (torch.distributed.run) exits 1 whatever its workers exited with, and a failed rendezvous
ends in a traceback. The operator reads a pod's exit code (2 invalid input, 143 preempted) and
its termination message, so this wrapper exits with the first failed rank's own code and, when no
worker ran (rendezvous timed out: a pod never started or cannot be reached), writes the one-line
summary naming that cause to LORA_TERMINATION_LOG.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .io.progress import write_termination_message

log = logging.getLogger("lora_trainer.launch")


def _code(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode  # killed by signal n -> 128 + n, as a shell


def launch(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        log.error("rank %s (node rank %s) failed first, exit code %s", rank, args.node_rank, failure.exitcode)
        return _code(failure.exitcode)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:  # no worker ran: the rendezvous failed
        where = f"{args.master_addr}:{args.master_port}"
        error = (f"rendezvous of node rank {args.node_rank} of {args.nnodes} at {where} failed: "
                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        log.error("%s", error)
        term = os.environ.get("LORA_TERMINATION_LOG")
        if term:
            write_termination_message(Path(term), {"state": "Failed", "error": error,
                                                   "attempt": int(os.environ.get("LORA_ATTEMPT") or 1)})
        return 1
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return launch(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
