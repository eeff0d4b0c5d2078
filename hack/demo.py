#!/usr/bin/env python3
"""`make demo`: the Harbor Support demo, end to end on this machine (dev tooling).

1. start the local control plane (real etcd, kube-apiserver, controller-manager, SeaweedFS S3, pod runner)
2. install the CRD and run the operator (a subprocess, log in .local/logs/operator-demo.log)
3. generate the Harbor Support data and the tiny generic base model (cached), upload both to S3
4. apply examples/harbor-support/job.yaml (QLoRA, with the base model's real fingerprint as revision)
   and, at the same time, the same job with `quantization: none` (hack/demo_compare.py)
5. follow both until they end, print each gate table, then the side-by-side comparison (time, memory,
   parameters, held-out loss, the checks on the hardest slice, adapter size), and leave loss.png
   (both variants' train/held-out loss) in .local/demo/ and next to the QLoRA job's artifacts
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

import demo_compare  # hack/, beside this script
import localcluster
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
    env = dict(os.environ)
    # The two trainer pods run at once on this machine: a share of the cores each, not two threads
    # each fighting over both (OpenMP threads spin while they wait). The pod runner passes these on;
    # a control plane that is already up keeps the environment it was started with.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    passenv = [v for v in env.get("LORA_PODRUNNER_PASSENV", "").split(",") if v]
    env["LORA_PODRUNNER_PASSENV"] = ",".join(dict.fromkeys([*passenv, "OMP_NUM_THREADS", "PYTHONPATH"]))
    run(PY, "hack/localcluster.py", "up", env=env)
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


def prepare_inputs() -> tuple[Path, Path, float]:
    """Data (always regenerated: <1 s) and the base model (cached); returns the base build seconds."""
    step("Harbor Support data and the tiny generic base model")
    data = DEMO / "data"
    run(PY, str(EXAMPLE / "make_data.py"), "--out", str(data))
    key = _source_hash(EXAMPLE / "make_data.py", EXAMPLE / "make_base.py",
                       ROOT / "trainer" / "lora_trainer" / "model" / "tiny_tokenizer.py")
    base = CACHE / "demo" / f"harbor-base-{key}"
    built_s = 0.0
    if not (base / "config.json").exists():
        print("training the base model on generic replies (first run only; cached afterwards)")
        tmp = base.with_name(base.name + ".tmp")
        t0 = time.time()
        run(PY, str(EXAMPLE / "make_base.py"), "--data", str(data), "--out", str(tmp))
        built_s = time.time() - t0
        tmp.rename(base)
        print(f"base model built in {built_s:.0f} s -> {base}")
    else:
        print(f"base model cached at {base}")
    return data, base, built_s


def s3_client(s3: dict[str, str]):
    from minio import Minio

    endpoint = s3["S3_ENDPOINT"].split("://", 1)[1]
    return Minio(endpoint, s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"], secure=False)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.rstrip("/")


def upload(s3: dict[str, str], data: Path, base: Path, outputs: list[str]) -> str:
    step("Upload to S3 (SeaweedFS)")
    from lora_trainer.io.storage import fingerprint_dir

    client = s3_client(s3)
    for bucket in ("models", "datasets", "artifacts"):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        client.fput_object("models", f"harbor-base/{f.relative_to(base)}", str(f))
    for f in sorted(data.glob("*.jsonl")):
        client.fput_object("datasets", f"harbor-support/{f.name}", str(f))
    for uri in outputs:  # a fresh run each time
        bucket, prefix = _split(uri)
        for obj in client.list_objects(bucket, prefix=prefix + "/", recursive=True):
            client.remove_object(bucket, obj.object_name)
    revision = fingerprint_dir(base)
    print(f"s3://models/harbor-base  revision {revision}")
    return revision


def apply_jobs(s3: dict[str, str], manifests: list[dict]) -> None:
    step("Apply examples/harbor-support/job.yaml (QLoRA) and the same job with quantization: none")
    kubectl("apply", "-f", "-", input=kubectl("create", "namespace", NAMESPACE, "--dry-run=client", "-o", "yaml"))
    secret = kubectl("create", "secret", "generic", "s3-credentials", "-n", NAMESPACE,
                     f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}",
                     "--dry-run=client", "-o", "yaml")
    kubectl("apply", "-f", "-", input=secret)
    names = [m["metadata"]["name"] for m in manifests]
    kubectl("delete", "ltj", *names, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    both = "---\n".join(yaml.safe_dump(m) for m in manifests)  # one apply: the operator sees both at once
    kubectl("apply", "-n", NAMESPACE, "-f", "-", input=both, capture=False)


def follow(names: list[str], operator: subprocess.Popen, timeout_s: float = 1800) -> dict[str, dict]:
    step(f"Following {', '.join('ltj/' + n for n in names)} (kubectl get ltj -n {NAMESPACE} -w)")
    width = max(len(n) for n in names)
    print(f"{'TIME':>6}  {'NAME':<{width}}  {'PHASE':<11} {'PROGRESS':<10} {'LOSS':>7} {'EVAL LOSS':>9} {'TOK/S':>7}")
    start, last, done = time.time(), {}, {}
    while time.time() - start < timeout_s:
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited ({operator.returncode}); see .local/logs/operator-demo.log")
        items = json.loads(kubectl("get", "ltj", *names, "-n", NAMESPACE, "-o", "json"))["items"]
        for obj in items:
            name, status = obj["metadata"]["name"], obj.get("status", {})
            progress = status.get("progress") or {}
            row = (status.get("phase") or "Pending", progress.get("summary", ""), progress.get("loss"),
                   progress.get("evalLoss"), progress.get("tokensPerSecond"))
            if row != last.get(name):
                loss, ev, tps = (f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in row[2:])
                tps = tps if tps == "-" else f"{float(tps):.0f}"
                print(f"{time.time() - start:5.0f}s  {name:<{width}}  {row[0]:<11} {row[1]:<10} {loss:>7} {ev:>9} {tps:>7}",
                      flush=True)
                last[name] = row
            if row[0] in TERMINAL:
                done[name] = obj
        if len(done) == len(names):
            return done
        time.sleep(2)
    raise SystemExit(f"{', '.join(sorted(set(names) - set(done)))} did not finish within {timeout_s:.0f} s")


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


def gate_table(obj: dict) -> None:
    status = obj.get("status", {})
    evaluation = status.get("evaluation") or {}
    step(f"ltj/{obj['metadata']['name']}: {status.get('phase')}  (gate: {evaluation.get('verdict', '-')})")
    for line in eval_table(evaluation.get("results", [])):
        print(line)
    for reason in evaluation.get("reasons", []):
        print(f"  reason: {reason}")
    for kind, uri in (status.get("artifacts") or {}).items():
        print(f"{kind:>9}: {uri}")


def _seconds(status: dict) -> float | None:
    from datetime import datetime

    start, end = status.get("startTime"), status.get("completionTime")
    if not (start and end):
        return None
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def _get_json(client, uri: str, default):
    bucket, key = _split(uri)
    try:
        raw = client.get_object(bucket, key).read().decode()
    except Exception:  # absent (a job that failed early): the table shows "-"
        return default
    return [json.loads(line) for line in raw.splitlines() if line.strip()] if key.endswith(".jsonl") else json.loads(raw)


def gather(client, obj: dict, base: Path, eval_records: list[dict]) -> dict:
    """What the comparison table needs from one finished job (reads its published files)."""
    out_uri = obj["spec"]["output"]["uri"].rstrip("/")
    facts = {"obj": obj, "wall_s": _seconds(obj.get("status", {})),
             "progress": _get_json(client, f"{out_uri}/progress.json", {}),
             "metrics": _get_json(client, f"{out_uri}/metrics.jsonl", [])}
    if obj.get("status", {}).get("phase") != "Succeeded":
        return facts
    # The published release's adapter (published/<release>/adapter/ under the output), as the status names it.
    bucket, prefix = _split((obj["status"].get("artifacts") or {}).get("adapter") or f"{out_uri}/adapter")
    local = DEMO / obj["metadata"]["name"] / "adapter"
    for item in client.list_objects(bucket, prefix=prefix + "/", recursive=True):
        client.fget_object(bucket, item.object_name, str(local / item.object_name[len(prefix) + 1:]))
        if item.object_name.endswith("adapter_model.safetensors"):
            facts["adapter_bytes"] = item.size
    from lora_operator.api import parse_manifest

    spec = parse_manifest(obj)
    records = demo_compare.hardest_slice(eval_records, spec.evaluation.max_samples)
    facts["slice"] = demo_compare.slice_report(spec, base, local, records)
    return facts


def plot_losses(columns: list[tuple[demo_compare.Variant, dict]], client, upload_to: str) -> str:
    """loss.png: train and held-out loss over steps for every variant (metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for variant, facts in columns:
        points = facts.get("metrics") or []
        for key, style, what in (("loss", "-", "train"), ("evalLoss", "o--", "held-out")):
            xy = [(p["step"], p[key]) for p in points if p.get(key) is not None and p.get("step") is not None]
            if xy:
                ax.plot(*zip(*xy), style, label=f"{variant.label}: {what}", alpha=0.9 if what == "held-out" else 0.6)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("loss (assistant tokens)"), ax.set_yscale("log")
    ax.set_title("Harbor Support: QLoRA vs unquantized LoRA"), ax.legend(fontsize=8)
    fig.tight_layout()
    DEMO.mkdir(parents=True, exist_ok=True)
    local = DEMO / "loss.png"
    fig.savefig(local, dpi=100)
    buf = local.read_bytes()
    bucket, prefix = _split(upload_to)
    client.put_object(bucket, f"{prefix}/loss.png", io.BytesIO(buf), len(buf), content_type="image/png")
    return f"{local}  and  {upload_to}/loss.png"


def report(done: dict[str, dict], variants: list[tuple[demo_compare.Variant, dict]], s3: dict[str, str],
           base: Path, data: Path) -> bool:
    for variant, _ in variants:
        gate_table(done[variant.name])
    step(f"QLoRA vs unquantized LoRA (hardest slice: {demo_compare.SLICE_NAME} of eval.jsonl, greedy, "
         "the job's checks; base -> adapter)")
    client = s3_client(s3)
    eval_records = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines() if line.strip()]
    t0 = time.time()
    columns = [(v, gather(client, done[v.name], base, eval_records)) for v, _ in variants]
    print(demo_compare.table(columns))
    print(f"(slice scored from the published adapters in {time.time() - t0:.0f} s)")
    print(f"plot: {plot_losses(columns, client, variants[0][1]['spec']['output']['uri'].rstrip('/'))}")
    return all(done[v.name].get("status", {}).get("phase") == "Succeeded" for v, _ in variants)


def main() -> None:
    t0 = time.time()
    s3 = start_cluster()
    operator = start_operator(s3)
    data, base, built_s = prepare_inputs()
    manifest = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    variants = demo_compare.variants(manifest)
    revision = upload(s3, data, base, [m["spec"]["output"]["uri"] for _, m in variants])
    for _, m in variants:
        m["spec"]["baseModel"]["revision"] = revision
    apply_jobs(s3, [m for _, m in variants])
    t_jobs = time.time()
    done = follow([v.name for v, _ in variants], operator)
    jobs_s = time.time() - t_jobs
    ok = report(done, variants, s3, base, data)
    total = time.time() - t0
    print(f"\ndemo finished in {total:.0f} s ({total / 60:.1f} min): base model build "
          f"{f'{built_s:.0f} s' if built_s else 'cached'}, both jobs apply -> done {jobs_s:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. "
          "`make cluster-down` stops the control plane")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
