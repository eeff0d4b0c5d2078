"""Fixtures for the chart tests: the real helm binary (hack/build-helm.sh) and a renderer."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-operator"


@dataclass(frozen=True)
class Helm:
    path: str
    home: Path  # HELM_{CACHE,CONFIG,DATA}_HOME: keep the user's helm state out of the tests

    def run(self, *args: str, check: bool = True, kubeconfig: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, **{f"HELM_{kind}_HOME": str(self.home / kind.lower())
                                for kind in ("CACHE", "CONFIG", "DATA")}}
        if kubeconfig:
            env["KUBECONFIG"] = kubeconfig
        proc = subprocess.run([self.path, *args], capture_output=True, text=True, env=env,
                              check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm v3 binary, built once from the Go module proxy and cached outside the repo."""
    try:
        proc = subprocess.run(["bash", str(REPO / "hack" / "build-helm.sh")], capture_output=True,
                              text=True, check=False, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"helm could not be built (hack/build-helm.sh): {exc}")
    if proc.returncode != 0:
        pytest.skip(f"helm could not be built (hack/build-helm.sh, rc={proc.returncode}): "
                    f"{proc.stderr.strip()[-500:]}")
    return Helm(path=proc.stdout.strip().splitlines()[-1], home=tmp_path_factory.mktemp("helm-home"))


def _set_args(values: dict) -> list[str]:
    """`--set-json` per top-level key: exact types, no YAML files to clean up."""
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[..., list[dict]]:
    """`helm template` of the chart with the given top-level values; returns the documents."""

    def _render(namespace: str = "ops", release: str = "rel", **values) -> list[dict]:
        out = helm.run("template", release, str(CHART), "--namespace", namespace, *_set_args(values)).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render


@pytest.fixture(scope="session")
def set_args() -> Callable[[dict], list[str]]:
    return _set_args
