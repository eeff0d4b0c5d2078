#!/usr/bin/env python3
"""`make demo`: the Harbor Support demo, end to end on this machine (dev tooling).

1. start the local control plane (real etcd, kube-apiserver, controller-manager, SeaweedFS S3, pod runner)
2. install the CRD and run the operator (a subprocess, log in .local/logs/operator-demo.log)
3. generate the Harbor Support data and the tiny generic base model (cached), upload both to S3
4. apply examples/harbor-support/job.yaml (with the base model's real fingerprint as revision)
5. follow the job until it ends, then print the eval table and the artifact URIs, and leave
   loss.png (train/eval loss and the base-vs-adapter checks) next to the artifacts and in .local/demo/
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import localcluster  # hack/, beside this script
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "harbor-support"
LOCAL = ROOT / ".local"
DEMO = LOCAL / "demo"
CACHE = Path(os.environ.get("LORA_CACHE", Path.home() / ".cache" / "lora-operator"))
NAMESPACE = "harbor-demo"
PY = sys.executable
TERMINAL = {"Succeeded", "Failed", "Rejected"}


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(*cmd: str, env: dict | None = None, capture: bool = False, input: str | None = None) -> str:
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, text=True, input=input,
                         stdout=subprocess.PIPE if capture else None)
    return out.stdout if capture else ""


def kubectl(*args: str, input: str | None = None, capture: bool = True) -> str:
    return run("kubectl", "--kubeconfig", str(LOCAL / "kubeconfig"), *args, input=input, capture=capture)


def start_cluster() -> dict[str, str]:
    step("Local control plane (first run builds the Kubernetes binaries; ~12 min on 2 cores)")
    run(PY, "hack/localcluster.py", "up")
    return localcluster.read_s3_env(LOCAL / "s3.env")


def start_operator(s3: dict[str, str]) -> subprocess.Popen:
    step("CRD and operator")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"), capture=False)
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/loratrainingjobs.training.lora.dev")
    log = open(LOCAL / "logs" / "operator-demo.log", "w")
    env = {
        **os.environ,
        "KUBECONFIG": str(LOCAL / "kubeconfig"),
        "LORA_S3_ENDPOINT": s3["S3_ENDPOINT"],
        "LORA_PROGRESS_INTERVAL": "3",
        "LORA_RESYNC_INTERVAL": "3",
        "LORA_METRICS_PORT": "0",
        "LORA_LIVENESS_ENDPOINT": "",
    }
    proc = subprocess.Popen([PY, "-m", "lora_operator", "--namespace", NAMESPACE], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    atexit.register(_stop, proc)
    print(f"operator pid {proc.pid}, log {log.name}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _source_hash(*files: Path) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def prepare_inputs() -> tuple[Path, Path]:
    step("Harbor Support data and the tiny generic base model")
    data = DEMO / "data"
    run(PY, str(EXAMPLE / "make_data.py"), "--out", str(data))
    key = _source_hash(EXAMPLE / "make_data.py", EXAMPLE / "make_base.py",
                       ROOT / "trainer" / "lora_trainer" / "model" / "tiny_tokenizer.py")
    base = CACHE / "demo" / f"harbor-base-{key}"
    if not (base / "config.json").exists():
        print("training the base model on generic replies (cached afterwards)")
        tmp = base.with_name(base.name + ".tmp")
        run(PY, str(EXAMPLE / "make_base.py"), "--data", str(data), "--out", str(tmp))
        tmp.rename(base)
    else:
        print(f"base model cached at {base}")
    return data, base


def upload(s3: dict[str, str], data: Path, base: Path) -> str:
    step("Upload to S3 (SeaweedFS)")
    from minio import Minio

    from lora_trainer.io.storage import fingerprint_dir

    endpoint = s3["S3_ENDPOINT"].split("://", 1)[1]
    client = Minio(endpoint, s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"], secure=False)
    for bucket in ("models", "datasets", "artifacts"):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        client.fput_object("models", f"harbor-base/{f.relative_to(base)}", str(f))
    for f in sorted(data.glob("*.jsonl")):
        client.fput_object("datasets", f"harbor-support/{f.name}", str(f))
    for obj in client.list_objects("artifacts", prefix="harbor-support/", recursive=True):
        client.remove_object("artifacts", obj.object_name)  # a fresh run each time
    revision = fingerprint_dir(base)
    print(f"s3://models/harbor-base  revision {revision}")
    return revision


def apply_job(s3: dict[str, str], revision: str) -> str:
    step("Apply examples/harbor-support/job.yaml")
    manifest = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    manifest["spec"]["baseModel"]["revision"] = revision
    name = manifest["metadata"]["name"]
    kubectl("apply", "-f", "-", input=kubectl("create", "namespace", NAMESPACE, "--dry-run=client", "-o", "yaml"))
    secret = kubectl("create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
                     f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}",
                     "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", input=secret)
    kubectl("delete", "ltj", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(manifest), capture=False)
    return name


def follow(name: str, operator: subprocess.Popen, timeout_s: float = 1800) -> dict:
    step(f"Following ltj/{name} (kubectl get ltj -n {NAMESPACE} -w)")
    print(f"{'TIME':>6}  {'PHASE':<11} {'PROGRESS':<12} {'LOSS':>8} {'EVAL LOSS':>10}  {'TOK/S':>8}")
    start, last, history = time.time(), None, []
    while time.time() - start < timeout_s:
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited ({operator.returncode}); see .local/logs/operator-demo.log")
        obj = json.loads(kubectl("get", "ltj", name, "-n", NAMESPACE, "-o", "json"))
        status = obj.get("status", {})
        progress = status.get("progress") or {}
        row = (status.get("phase") or "Pending", progress.get("summary", ""), progress.get("loss"),
               progress.get("evalLoss"), progress.get("tokensPerSecond"))
        if row != last:
            loss, ev, tps = (f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in row[2:])
            print(f"{time.time() - start:5.0f}s  {row[0]:<11} {row[1]:<12} {loss:>8} {ev:>10}  {tps:>8}", flush=True)
            history.append({"t": time.time() - start, "step": progress.get("step"), "loss": row[2], "evalLoss": row[3]})
            last = row
        if row[0] in TERMINAL:
            obj["demoHistory"] = history
            return obj
        time.sleep(2)
    raise SystemExit(f"ltj/{name} did not finish within {timeout_s:.0f} s")


def eval_table(results: list[dict]) -> list[str]:
    """base | adapter, plus a champion column when the gate compared with a channel's live adapter."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    champion = any("champion" in r for r in results)
    extra = f" {'champion':>10}" if champion else ""
    lines = [f"{'metric':<28} {'base':>10}{extra} {'adapter':>10}  {'threshold':<16} ok"]
    for r in results:
        middle = f" {fmt(r.get('champion')):>10}" if champion else ""
        lines.append(f"{r['name']:<28} {fmt(r.get('base')):>10}{middle} {fmt(r.get('adapter')):>10}  "
                     f"{r.get('threshold') or '':<16} {'yes' if r.get('passed') else 'NO'}")
    return lines


def report(obj: dict, s3: dict[str, str]) -> None:
    status = obj.get("status", {})
    evaluation = status.get("evaluation") or {}
    step(f"Result: {status.get('phase')}  (gate: {evaluation.get('verdict', '-')})")
    for line in eval_table(evaluation.get("results", [])):
        print(line)
    for reason in evaluation.get("reasons", []):
        print(f"  reason: {reason}")
    for kind, uri in (status.get("artifacts") or {}).items():
        print(f"{kind:>9}: {uri}")
    plot = plot_losses(obj, s3)
    if plot:
        print(f"plot: {plot}")
    if status.get("phase") != "Succeeded":
        raise SystemExit(1)


def plot_losses(obj: dict, s3: dict[str, str]) -> str | None:
    """loss.png: train/eval loss over steps (metrics.jsonl if the trainer wrote it) + eval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from minio import Minio

    client = Minio(s3["S3_ENDPOINT"].split("://", 1)[1], s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"],
                   secure=False)
    out_uri = obj["spec"]["output"]["uri"]
    bucket, _, prefix = out_uri.removeprefix("s3://").partition("/")
    points = obj.get("demoHistory", [])
    try:
        raw = client.get_object(bucket, f"{prefix}/metrics.jsonl").read().decode()
        points = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except Exception:  # older trainers: fall back to what the status showed while following
        pass
    results = (obj.get("status", {}).get("evaluation") or {}).get("results", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss"), ("evalLoss", "held-out loss")):
        xy = [(p["step"], p[key]) for p in points if p.get(key) is not None and p.get("step") is not None]
        if xy:
            ax1.plot(*zip(*xy), marker="o" if key == "evalLoss" else None, label=label)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss"), ax1.legend(), ax1.set_title("Harbor Support LoRA")
    names = [r["name"] for r in results]
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], [r.get("base") or 0 for r in results], 0.4, label="base")
    ax2.bar([x + 0.2 for x in xs], [r.get("adapter") or 0 for r in results], 0.4, label="adapter")
    ax2.set_xticks(list(xs), names, rotation=30, ha="right"), ax2.legend(), ax2.set_title("base vs adapter")
    fig.tight_layout()
    DEMO.mkdir(parents=True, exist_ok=True)
    local = DEMO / "loss.png"
    fig.savefig(local, dpi=100)
    buf = local.read_bytes()
    client.put_object(bucket, f"{prefix}/loss.png", io.BytesIO(buf), len(buf), content_type="image/png")
    return f"{local}  and  {out_uri}/loss.png"


def main() -> None:
    t0 = time.time()
    s3 = start_cluster()
    operator = start_operator(s3)
    data, base = prepare_inputs()
    revision = upload(s3, data, base)
    name = apply_job(s3, revision)
    obj = follow(name, operator)
    report(obj, s3)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; `make cluster-down` stops the control plane")


if __name__ == "__main__":
    main()
