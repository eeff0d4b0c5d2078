"""`python -m lora_operator` / `lora-operator`: run the kopf operator with our handlers."""

from __future__ import annotations

import argparse
import os
import sys

import kopf

from .config import OperatorConfig


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable); default: LORA_NAMESPACES or all")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--liveness", default=None, help="liveness endpoint (LORA_LIVENESS_ENDPOINT)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    config = OperatorConfig.from_env(os.environ)
    log_format = kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN
    kopf.configure(verbose=args.verbose, log_format=log_format)
    from . import handlers  # noqa: F401  (registers the handlers)

    namespaces = [] if args.all_namespaces else (args.namespace or list(config.namespaces))
    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate); no peering objects needed
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or config.liveness_endpoint,
        memo=kopf.Memo(namespaces=tuple(namespaces)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
