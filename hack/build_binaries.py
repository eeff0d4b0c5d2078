#!/usr/bin/env python3
"""Build (once) and cache the control-plane binaries for the local dev cluster.

kube-apiserver and kube-controller-manager come from the ``k8s.io/kubernetes`` Go module and
etcd from ``go.etcd.io/etcd/server/v3``. ``go install`` refuses k8s.io/kubernetes because its
go.mod replaces the k8s.io/* staging modules with local paths, so we generate a wrapper module
(outside the repo, under the cache dir) that requires k8s.io/kubernetes and replaces every
staging module with its published v0.Y.Z twin, plus tiny ``main`` packages that mirror
cmd/kube-apiserver and cmd/kube-controller-manager.

Layout: ``${LORA_CACHE:-~/.cache/lora-operator}/bin/<k8s-version>/{etcd,kube-apiserver,
kube-controller-manager}`` with ``build.json`` recording the versions; a second run is a no-op.
If ``KUBEBUILDER_ASSETS`` is set, binaries found there are used and only missing ones are built.

Kueue (``--kueue``): ``go install sigs.k8s.io/kueue/cmd/kueue@<LORA_KUEUE_VERSION>`` into
``bin/kueue-<version>/kueue`` (its go.mod has no replace directives, so no wrapper module); a binary at
``KUEUE_BIN`` is used instead. Its CRDs and webhook manifests are read from the same module's source
in the Go module cache (``kueue_source()``).

Stdlib only, so it runs before the project venv exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

K8S_VERSION = os.environ.get("LORA_K8S_VERSION", "v1.34.4")
ETCD_VERSION = os.environ.get("LORA_ETCD_VERSION", "v3.6.16")
KUEUE_VERSION = os.environ.get("LORA_KUEUE_VERSION", "v0.17.0")
KUEUE_MODULE = "sigs.k8s.io/kueue"
CACHE = Path(os.environ.get("LORA_CACHE", Path.home() / ".cache" / "lora-operator"))
GO = shutil.which("go") or "/usr/local/go/bin/go"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

MAIN_TEMPLATE = """package main

import (
	"os"
	_ "time/tzdata"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/{cmd}/app"
)

func main() {{
	os.Exit(cli.Run(app.{ctor}()))
}}
"""

ETCD_MAIN = """package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
"""


def log(msg: str) -> None:
    print(f"[build-binaries {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bin_dir() -> Path:
    return CACHE / "bin" / K8S_VERSION


def go(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local", CGO_ENABLED="0")
    log(f"$ go {' '.join(args)}  (in {cwd})")
    subprocess.run([GO, *args], cwd=cwd, env=env, check=True)


def staging_replaces(version: str) -> dict[str, str]:
    """Map each staging module (``k8s.io/api`` ...) to its published version for this release."""
    out = subprocess.run([GO, "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, GOTOOLCHAIN="local")).stdout
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    staging_version = "v0" + version[2:]  # v1.34.4 -> v0.34.4
    mods = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.MULTILINE)
    return {m: staging_version for m in mods}


def version_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    values = {"gitVersion": version, "gitMajor": major, "gitMinor": minor,
              "gitTreeState": "clean", "gitCommit": "0000000000000000000000000000000000000000",
              "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{k}={v}" for k, v in values.items()]
    return " ".join(flags)


def build_kubernetes(names: list[str], out: Path) -> None:
    src = CACHE / "src" / f"kubernetes-{K8S_VERSION}"
    src.mkdir(parents=True, exist_ok=True)
    lines = ["module localcluster/kubernetes", "", "go 1.24.0", "",
             f"require k8s.io/kubernetes {K8S_VERSION}", "", "replace ("]
    lines += [f"\t{m} => {m} {v}" for m, v in sorted(staging_replaces(K8S_VERSION).items())]
    lines += [")", ""]
    (src / "go.mod").write_text("\n".join(lines))
    ctors = {"kube-apiserver": "NewAPIServerCommand",
             "kube-controller-manager": "NewControllerManagerCommand"}
    for name in names:
        (src / name).mkdir(exist_ok=True)
        (src / name / "main.go").write_text(MAIN_TEMPLATE.format(cmd=name, ctor=ctors[name]))
    log(f"resolving k8s.io/kubernetes {K8S_VERSION} dependencies (first time: a few minutes)")
    go(["mod", "tidy"], src)
    ldflags = f"-s -w {version_ldflags(K8S_VERSION)}"
    for name in names:
        log(f"compiling {name} (first time: ~10 min on 2 cores)")
        go(["build", "-p", os.environ.get("LORA_BUILD_JOBS", "2"), "-trimpath",
            "-ldflags", ldflags, "-o", str(out / name), f"./{name}"], src)


def build_etcd(out: Path) -> None:
    src = CACHE / "src" / f"etcd-{ETCD_VERSION}"
    (src / "etcd").mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text("module localcluster/etcd\n\ngo 1.24.0\n\n"
                                f"require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n")
    (src / "etcd" / "main.go").write_text(ETCD_MAIN)
    log(f"resolving etcd {ETCD_VERSION} dependencies")
    go(["mod", "tidy"], src)
    log("compiling etcd")
    go(["build", "-p", os.environ.get("LORA_BUILD_JOBS", "2"), "-trimpath",
        "-ldflags", "-s -w", "-o", str(out / "etcd"), "./etcd"], src)


def kueue_bin() -> Path:
    """``KUEUE_BIN`` when set, else the cached build."""
    return Path(os.environ["KUEUE_BIN"]) if os.environ.get("KUEUE_BIN") else (
        CACHE / "bin" / f"kueue-{KUEUE_VERSION}" / "kueue")


def kueue_source() -> Path:
    """The Kueue module's source (config/components/...) in the Go module cache; downloads once."""
    out = subprocess.run([GO, "mod", "download", "-json", f"{KUEUE_MODULE}@{KUEUE_VERSION}"], check=True,
                         capture_output=True, text=True, env=dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="")).stdout
    return Path(json.loads(out)["Dir"])


def build_kueue() -> int:
    target = kueue_bin()
    if target.is_file() and os.access(target, os.X_OK):
        log(f"up to date: {target}")
        return 0
    if os.environ.get("KUEUE_BIN"):
        raise SystemExit(f"KUEUE_BIN={target} is not an executable file")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"building kueue {KUEUE_VERSION} (first time: ~5 min on 2 idle cores)")
    flags = " ".join(f"-X {KUEUE_MODULE}/pkg/version.{k}={v}" for k, v in
                     (("GitVersion", KUEUE_VERSION), ("BuildDate", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))))
    env = dict(os.environ, GOBIN=str(target.parent), GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="")
    subprocess.run([GO, "install", "-p", os.environ.get("LORA_BUILD_JOBS", "2"), "-trimpath",
                    "-ldflags", f"-s -w {flags}", f"{KUEUE_MODULE}/cmd/kueue@{KUEUE_VERSION}"], env=env, check=True)
    log(f"built kueue in {time.monotonic() - started:.0f}s -> {target}")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--kueue"]:
        return build_kueue()
    out = bin_dir()
    stamp = out / "build.json"
    want = {"kubernetes": K8S_VERSION, "etcd": ETCD_VERSION}
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    missing = []
    for name in BINARIES:
        if assets and (Path(assets) / name).is_file():
            continue  # localcluster.py prefers KUBEBUILDER_ASSETS over the cache
        version_ok = have.get("etcd" if name == "etcd" else "kubernetes") == want[
            "etcd" if name == "etcd" else "kubernetes"]
        if not ((out / name).is_file() and version_ok):
            missing.append(name)
    if not missing:
        log(f"up to date: {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if "etcd" in missing:
        build_etcd(out)
    k8s = [n for n in missing if n != "etcd"]
    if k8s:
        build_kubernetes(k8s, out)
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    log(f"built {', '.join(missing)} in {time.monotonic() - started:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
