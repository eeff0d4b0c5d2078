"""Pod hostnames and cluster DNS for the local pod runner's real processes (dev tooling).

On a cluster the kubelet sets a pod's hostname (`spec.hostname`, else its name) and cluster DNS
resolves `<hostname>.<subdomain>.<namespace>.svc.cluster.local` for the pods behind a headless
Service named `<subdomain>` (an Indexed Job's pods are `<job>-<index>`). Here every pod shares the
loopback, so all those names map to 127.0.0.1 and only one process can bind a given port (rank 0
the rendezvous port, as on a cluster).

How the pod command stays untouched: a pod with a `subdomain` runs in its own mount and UTS
namespace (`unshare`): a per-pod hosts file is bind-mounted over /etc/hosts and the hostname set,
then the command is exec'ed (same pid, so signals and exit codes are the command's own). The
hosts file holds the pod's own names (as the kubelet writes them) and, when the Service exists,
those of the other running pods of the same subdomain. It only ever grows, by appending (a
reader never sees it empty); a pod that appears later is appended to every peer's file, and the
bind mount sees the change because the inode stays the same. Names of pods that ended stay: they
carry the attempt in their name, so nothing asks for them again.

Without `unshare` rights (no root, no user namespaces) pods run as before and cannot resolve
these names; tests that need them check `isolation_available()` and skip.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from functools import lru_cache
from pathlib import Path

CLUSTER_DOMAIN = "cluster.local"
LOOPBACK = "127.0.0.1"
# $1 hosts file, $2 hostname, then the pod's argv.
_ENTER = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'


def pod_hostname(pod: dict) -> str:
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def pod_names(pod: dict) -> list[str]:
    """The names other pods may use for this one, longest first (no search path in /etc/hosts)."""
    sub, ns, host = pod["spec"].get("subdomain"), pod["metadata"]["namespace"], pod_hostname(pod)
    if not sub:
        return [host]
    return [f"{host}.{sub}.{ns}.svc.{CLUSTER_DOMAIN}", f"{host}.{sub}.{ns}.svc", f"{host}.{sub}.{ns}",
            f"{host}.{sub}"]


def hosts_line(pod: dict, own: bool = False) -> str:
    names = pod_names(pod) + ([pod_hostname(pod)] if own and pod["spec"].get("subdomain") else [])
    return f"{LOOPBACK}\t{' '.join(names)}\n"


HEADER = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@lru_cache(maxsize=1)
def _unshare_flags() -> tuple[str, ...] | None:
    if not shutil.which("unshare"):
        return None
    for flags in (("--mount", "--uts"), ("--map-root-user", "--mount", "--uts")):
        probe = ["unshare", *flags, "sh", "-c", "mount --bind /etc/hosts /etc/hosts && hostname probe"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return flags
    return None


def isolation_available() -> bool:
    return _unshare_flags() is not None


class PodDNS:
    """Per-pod hosts files; `wrap` gives the argv that runs a pod's command behind its own."""

    def __init__(self, service_exists, log):
        self.service_exists, self.log = service_exists, log  # (namespace, name) -> bool
        self.lock = threading.Lock()
        self.files: dict[str, tuple[dict, Path, set[str]]] = {}  # uid -> (pod, hosts file, lines)
        self.warned = False

    def wrap(self, pod: dict, pod_dir: Path, argv: list[str]) -> list[str]:
        if not pod["spec"].get("subdomain"):
            return argv
        flags = _unshare_flags()
        if flags is None:
            if not self.warned:
                self.log("pod DNS: unshare is not available; pods with a subdomain cannot resolve their peers")
                self.warned = True
            return argv
        hosts = pod_dir / "etc-hosts"
        self._register(pod, hosts)
        return ["unshare", *flags, "--", "sh", "-c", _ENTER, "podrunner-dns", str(hosts), pod_hostname(pod),
                *argv]

    def forget(self, uid: str) -> None:
        with self.lock:
            self.files.pop(uid, None)

    def _register(self, pod: dict, hosts: Path) -> None:
        meta, sub = pod["metadata"], pod["spec"]["subdomain"]
        own = hosts_line(pod, own=True)
        with self.lock:
            if meta["uid"] not in self.files:
                hosts.write_text(HEADER + own)
                self.files[meta["uid"]] = (pod, hosts, {own})
            peers = [(p, f, lines) for uid, (p, f, lines) in self.files.items()
                     if uid != meta["uid"] and p["metadata"]["namespace"] == meta["namespace"]
                     and p["spec"].get("subdomain") == sub]
        if not peers or not self.service_exists(meta["namespace"], sub):
            return
        with self.lock:
            mine = self.files[meta["uid"]]
            for peer, path, lines in peers:
                self._append(path, lines, hosts_line(pod))
                self._append(mine[1], mine[2], hosts_line(peer))

    @staticmethod
    def _append(path: Path, lines: set[str], line: str) -> None:
        if line in lines:
            return
        with open(path, "a") as f:  # same inode: the bind mount sees it
            f.write(line)
        lines.add(line)


def service_exists_via(api):
    """(namespace, name) -> whether that Service exists, through the runner's Api."""
    def check(namespace: str, name: str) -> bool:
        try:
            return api.get(f"/api/v1/namespaces/{namespace}/services/{name}") is not None
        except Exception:
            return False
    return check

