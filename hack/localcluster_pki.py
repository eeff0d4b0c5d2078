"""Keys, certificates, static tokens and kubeconfigs for hack/localcluster.py (uses the openssl CLI).

Created once per ``.local/pki``; ``down --purge`` removes them. The admin user authenticates with a
static token in group ``system:masters``; kube-controller-manager uses the well-known
``system:kube-controller-manager`` user, which the bootstrap RBAC policy already binds.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

SERVING_SANS = ["IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes",
                "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ensure(pki: Path, state: dict, node_name: str) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    if not (pki / "ca.crt").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.crt", "-days", "3650", "-subj", "/CN=lora-local-ca", cwd=pki)
    if not (pki / "apiserver.crt").exists():
        (pki / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(SERVING_SANS)}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
                 "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=pki)
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "apiserver.crt", "-days", "3650",
                 "-extfile", "apiserver.ext", cwd=pki)
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    tokens = pki / "tokens.csv"
    tokens.write_text(f'{state["admin_token"]},admin,admin,"system:masters"\n'
                      f'{state["kcm_token"]},system:kube-controller-manager,kcm\n')
    tokens.chmod(0o600)


def kubeconfig(server: str, ca: Path, user: str, token: str) -> str:
    ca_data = base64.b64encode(ca.read_bytes()).decode()
    return f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {server}
    certificate-authority-data: {ca_data}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: local
  context:
    cluster: local
    user: {user}
    namespace: default
current-context: local
"""


def write_kubeconfigs(local: Path, state: dict) -> None:
    server = f"https://127.0.0.1:{state['ports']['apiserver']}"
    ca = local / "pki" / "ca.crt"
    for name, user, token in (("kubeconfig", "admin", state["admin_token"]),
                              ("kube-controller-manager.kubeconfig",
                               "system:kube-controller-manager", state["kcm_token"])):
        path = local / name
        path.write_text(kubeconfig(server, ca, user, token))
        path.chmod(0o600)


def serving_cert(pki: Path, name: str, sans: list[str]) -> tuple[Path, Path]:
    """A TLS serving certificate signed by the local CA (``<name>.crt`` / ``<name>.key``), made once."""
    crt, key = pki / f"{name}.crt", pki / f"{name}.key"
    if not crt.exists():
        (pki / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(sans)}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", crt.name, "-days", "3650", "-extfile", f"{name}.ext", cwd=pki)
    return crt, key
