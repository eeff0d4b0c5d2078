"""hack/localcluster.py starts every time on a busy machine, and nothing it started outlives `down`.

These tests run their own stacks in a temporary LORA_LOCAL_DIR, so a session cluster in .local/
is not disturbed.
"""

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

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "localcluster.py"
sys.path.insert(0, str(REPO / "hack"))
import localcluster_proc as proc  # noqa: E402

# Each cycle is one `up` and one `down` from cached binaries; measured 30-50 s per cycle under the hog on
# a 2-core machine that several other test runs shared (load ~20). LORA_STACK_CYCLES=20 for a soak.
CYCLES = int(os.environ.get("LORA_STACK_CYCLES", "4"))


def run(local: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "LORA_LOCAL_DIR": str(local)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def naming(local: Path) -> list[str]:
    """Live processes with this stack's directory anywhere in their command line."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(local) in cmdline and state not in ("Z", "X"):
            out.append(f"{entry.name}: {cmdline.replace(chr(0), ' ')[:160]}")
    return out


def recorded(local: Path) -> dict[str, tuple[int, int]]:
    """component -> (pid, start time) from the pid files `up` wrote."""
    out = {}
    for f in (local / "pids").glob("*.pid"):
        rec = json.loads(f.read_text())
        out[f.stem] = (rec["pid"], rec["start"])
    return out


def assert_nothing_left(local: Path, components: dict[str, tuple[int, int]]) -> None:
    for name, (pid, start) in components.items():
        assert proc.start_time(pid) != start or proc._stat(pid)[0] in ("Z", "X"), f"{name} (pid {pid}) still runs"
        assert not proc.group_members(pid), f"{name}'s process group {pid} still has {proc.group_members(pid)}"
    assert not naming(local), f"processes of the stack outlived down: {naming(local)}"
    state = json.loads((local / "state.json").read_text())
    taken = {k: v for k, v in state["ports"].items() if not proc.port_free(v)}
    assert not taken, f"ports still bound after down: {taken}"


@pytest.fixture
def hog():
    """One busy loop per core, to reproduce the load under which starts used to fail."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    yield
    for h in hogs:
        h.kill()
        h.wait()


@pytest.fixture
def local(tmp_path: Path):
    d = tmp_path / "local"
    yield d
    run(d, "down", "--purge", timeout=120)


@pytest.mark.cluster
def test_every_up_succeeds_under_cpu_load_and_down_leaves_no_process_or_port(local, hog):
    times = []
    for cycle in range(CYCLES):
        t0 = time.monotonic()
        up = run(local, "up")
        assert up.returncode == 0, f"cycle {cycle}: up failed:\n{up.stdout}{up.stderr}"
        t1 = time.monotonic()
        assert "retrying" not in up.stdout + up.stderr and "attempt 1/" not in up.stdout, up.stdout
        components = recorded(local)
        assert sorted(components) == sorted(["etcd", "s3", "kube-apiserver", "kube-controller-manager", "podrunner"])
        assert run(local, "status").returncode == 0
        down = run(local, "down")
        assert down.returncode == 0, f"cycle {cycle}: down failed:\n{down.stdout}{down.stderr}"
        times.append((t1 - t0, time.monotonic() - t1))
        assert_nothing_left(local, components)
    print("up/down seconds per cycle:", [f"{u:.1f}/{d:.1f}" for u, d in times])


@pytest.mark.cluster
def test_a_port_taken_since_the_last_start_moves_that_component(local):
    assert run(local, "up").returncode == 0
    assert run(local, "down").returncode == 0
    old = json.loads((local / "state.json").read_text())["ports"]["apiserver"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old))
        squatter.listen()
        up = run(local, "up")
        assert up.returncode == 0, up.stdout + up.stderr
    new = json.loads((local / "state.json").read_text())["ports"]["apiserver"]
    assert new != old and f"port {old} (apiserver) is taken" in up.stdout
    assert f"https://127.0.0.1:{new}" in (local / "kubeconfig").read_text()
    components = recorded(local)
    assert run(local, "down").returncode == 0
    assert_nothing_left(local, components)


@pytest.mark.cluster
def test_a_component_that_cannot_start_is_named_with_its_log_and_everything_started_is_stopped(local, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    bin_dir = Path(__import__("build_binaries").bin_dir())
    for name in ("etcd", "kube-controller-manager"):
        (assets / name).symlink_to(bin_dir / name)
    children = tmp_path / "children"
    children.mkdir()
    fake = assets / "kube-apiserver"  # leaves a child in its process group, then fails
    fake.write_text('#!/bin/sh\nsleep 600 &\necho $! > "$FAKE_CHILDREN/$$"\n'
                    'echo "E1129 run.go:72] listen tcp 127.0.0.1:1: bind: address already in use"\nexit 1\n')
    fake.chmod(0o755)
    up = run(local, "up", env={"KUBEBUILDER_ASSETS": str(assets), "FAKE_CHILDREN": str(children)})
    assert up.returncode == 1
    assert "kube-apiserver failed to start: exited with code 1" in up.stderr
    assert "bind: address already in use" in up.stderr  # the log tail
    assert "attempt 1/2" in up.stdout  # retried once, after cleaning up
    pids = [int(f.read_text()) for f in children.iterdir()]
    assert len(pids) == 2
    for pid in pids:
        assert proc._stat(pid) is None or proc._stat(pid)[0] in ("Z", "X"), f"fake apiserver's child {pid} survived"
    assert not naming(local), naming(local)
    assert not list((local / "pids").glob("*.pid"))


@pytest.mark.cluster
def test_up_interrupted_by_sigterm_stops_what_it_started(local):
    env = {**os.environ, "LORA_LOCAL_DIR": str(local)}
    up = subprocess.Popen([sys.executable, str(SCRIPT), "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (local / "pids" / "kube-apiserver.pid").exists():
        assert up.poll() is None and time.monotonic() < deadline, "up never started kube-apiserver"
        time.sleep(0.05)
    up.send_signal(signal.SIGTERM)
    out, _ = up.communicate(timeout=120)
    assert up.returncode == 128 + signal.SIGTERM, out
    assert not naming(local), naming(local)


def test_a_recorded_pid_counts_as_ours_only_with_the_same_start_time(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "x.pid").write_text(json.dumps({"pid": child.pid, "start": proc.start_time(child.pid)}))
        assert proc.recorded("x", tmp_path, tmp_path).alive()
        (tmp_path / "x.pid").write_text(json.dumps({"pid": child.pid, "start": 1}))  # pid reused
        stale = proc.recorded("x", tmp_path, tmp_path)
        assert not stale.alive() and not stale.ours()
        stale.stop(timeout=1.0)
        assert child.poll() is None  # a process that is not ours is never signalled
    finally:
        child.kill()
        child.wait()


def test_a_spawned_process_is_alive_at_once_and_its_whole_group_is_stopped(tmp_path):
    # A shell that backgrounds a child and exits is dead, but its group is not empty until stop().
    p = proc.spawn("sh", ["sh", "-c", "sleep 60 & sleep 60"], tmp_path / "pids", tmp_path / "logs", tmp_path)
    assert p.alive() and proc.recorded("sh", tmp_path / "pids", tmp_path / "logs").alive()
    deadline = time.monotonic() + 10
    while len(proc.group_members(p.pid)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.stop(timeout=5.0)
    assert not p.alive() and proc.group_members(p.pid) == []
    assert p.exit_reason() == "killed by SIGTERM"


def test_ports_are_picked_below_the_ephemeral_range_and_a_listening_port_is_not_free():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    port = proc.pick_port(set())
    assert 1024 <= port < low
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not proc.port_free(port)
        assert proc.pick_port(set()) != port
    assert proc.port_free(port)
