"""Processes of the local stack (hack/localcluster.py): start, judge alive, stop, find leftovers.

Liveness never reads ``/proc/<pid>/cmdline``: right after ``Popen`` returns, the kernel may not yet
have set up the new program's arguments (the parent learns that ``exec`` began when its close-on-exec
pipe closes, before the new image's argument area exists), so a cmdline read can come back empty and
a healthy component looked dead. Instead:

* the process that started a component keeps its ``Popen`` handle and asks it (``poll``);
* any other process (``status``, ``down``) compares the pid file's recorded start time (field 22 of
  ``/proc/<pid>/stat``, fixed at fork, unchanged by exec) with the live process's, so a reused pid
  is never mistaken for ours.

Every component runs in its own session, so its process group id is its pid; stopping a component
signals the whole group and waits until no member of the group is left (zombies excepted: nobody may
be reaping orphans in a container).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        data = path.read_bytes()[-8192:].decode(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"    {line}" for line in data[-lines:]) or "    (log is empty)"


class StartError(Exception):
    """A component did not come up: which one, why, and the end of its log."""

    def __init__(self, component: str, why: str, log: Path | None = None):
        self.component = component
        tail = f"\n  last lines of {log}:\n{log_tail(log)}" if log else ""
        super().__init__(f"{component} failed to start: {why}{tail}")


@dataclass
class Proc:
    """A component process: from ``spawn`` (with its Popen handle) or from its pid file."""

    name: str
    pid: int
    started: int | None  # /proc start time in clock ticks
    log: Path
    handle: subprocess.Popen | None = None

    def alive(self) -> bool:
        if self.handle is not None:
            return self.handle.poll() is None
        fields = _stat(self.pid)
        return bool(fields) and fields[0] not in ("Z", "X") and int(fields[19]) == self.started

    def ours(self) -> bool:
        """True when signalling group ``pid`` reaches this component's processes and nobody else's.

        The leader alive with our start time: ours. The leader gone but its group still has
        members: ours too (the kernel does not reuse a pid while a group with that id exists).
        """
        if self.handle is not None:
            return True
        now = start_time(self.pid)
        return now == self.started if now is not None else bool(group_members(self.pid))

    def exit_reason(self) -> str:
        code = self.handle.poll() if self.handle is not None else None
        if code is None:
            return "exited"
        return f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"

    def stop(self, timeout: float, log=print) -> None:
        if not self.ours():
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                return
            if self._wait_gone(wait):
                break
            if sig == signal.SIGTERM:
                log(f"{self.name} did not stop on SIGTERM within {timeout:.0f}s; sending SIGKILL")
        if self.handle is not None:
            try:
                self.handle.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        left = group_members(self.pid)
        if left:
            raise RuntimeError(f"{self.name}: processes {left} survived SIGKILL")

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.handle is not None:
                self.handle.poll()  # reap, so the leader does not linger as our zombie
            if not group_members(self.pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def spawn(name: str, argv: list[str], pids: Path, logs: Path, cwd: Path, env: dict | None = None) -> Proc:
    pids.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        handle = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, cwd=cwd, env=env)
    proc = Proc(name, handle.pid, start_time(handle.pid), log, handle)
    tmp = pids / f".{name}.pid.tmp"
    tmp.write_text(json.dumps({"pid": proc.pid, "start": proc.started, "argv0": argv[0]}) + "\n")
    tmp.replace(pids / f"{name}.pid")
    return proc


def recorded(name: str, pids: Path, logs: Path) -> Proc | None:
    """The component's process as its pid file records it (None without a readable pid file)."""
    try:
        text = (pids / f"{name}.pid").read_text()
    except OSError:
        return None
    try:
        rec = json.loads(text)
        return Proc(name, int(rec["pid"]), rec.get("start"), logs / f"{name}.log")
    except (ValueError, KeyError, TypeError):
        pass
    try:  # the "<pid> <marker>" files of earlier versions: long exec'ed, so the marker check is safe
        pid, marker = text.split(maxsplit=1)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    return Proc(name, int(pid), start_time(int(pid)), logs / f"{name}.log") if marker.strip() in cmdline else None


def with_argument(arguments: set[str]) -> list[int]:
    """Processes whose command line has one of ``arguments`` as a whole argument (leftovers of
    this stack: every component's command line names a file or directory of its .local/)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                args = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if arguments.intersection(args):
                out.append(int(entry.name))
    return out


def started_at(pid: int) -> float | None:
    """When a process started, in seconds since the epoch."""
    ticks = start_time(pid)
    if ticks is None:
        return None
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    return btime + ticks / CLK_TCK


def stop_leftovers(pids: list[int], log=print) -> None:
    """Stop processes no pid file accounts for: a group leader with its group, others alone."""
    for pid in pids:
        fields = _stat(pid)
        if not fields or fields[0] in ("Z", "X"):
            continue
        log(f"stopping leftover process {pid}")
        if int(fields[2]) == pid:
            Proc("leftover", pid, int(fields[19]), Path("/dev/null")).stop(timeout=5.0, log=log)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pick_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range, so outgoing connections never hold it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 12000), low)
        if port not in taken and port_free(port):
            return port
    raise RuntimeError("no free port found below the ephemeral range")
