"""The demo's QLoRA vs unquantized LoRA comparison (dev tooling, used by hack/demo.py).

The guide's checklist says: compare QLoRA with 16-bit LoRA on your hardest eval slice before cutting
VRAM corners. The demo applies examples/harbor-support/job.yaml (QLoRA) and the same manifest with
`quantization: none` at once, then builds one table from what each job published:

- wall time, peak memory and trainable parameters from the status and `progress.json`;
- held-out loss from the gate's results (`status.evaluation`);
- tone adherence (every generation check passes) and each check's pass rate, base -> adapter, on
  the hardest slice: the escalation tickets (damage reports, billing disputes, lost items; their
  house reply must open with the apology, keep money in prose and escalate in the house sentence).
  The trainer's gate scores the first `maxSamples` held-out tickets of all kinds; the slice is
  scored here by loading the *published* adapter onto the base exactly as the trainer does
  (`lora_trainer.evaluation.scoring.load_adapted`: NF4 for the QLoRA job) and running the job's own checks;
- the adapter's size in object storage.

Everything but `slice_report` is pure, so tests/examples/test_demo_compare.py covers it directly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# The house escalation sentence (examples/harbor-support/make_data.py ESCALATION): a held-out ticket
# whose reference reply contains it is an escalation ticket.
ESCALATION_MARKER = "I've escalated this to our Harbor Care team"
SLICE_NAME = "escalation tickets"
NOQUANT_SUFFIX = "-noquant"


@dataclass(frozen=True)
class Variant:
    name: str  # the LoRATrainingJob's name
    label: str  # column heading


def variants(manifest: dict) -> list[tuple[Variant, dict]]:
    """The job as checked in (QLoRA) and the same job with `quantization: none`, own name and output."""
    spec = manifest["spec"]
    name = manifest["metadata"]["name"]
    bits = "NF4 + double quant" if spec.get("doubleQuant", True) else "NF4"
    qlora = (Variant(name, f"QLoRA ({bits})"), manifest)
    plain = copy.deepcopy(manifest)
    plain["metadata"]["name"] = name + NOQUANT_SUFFIX
    plain["spec"]["quantization"] = "none"
    plain["spec"]["output"]["uri"] = spec["output"]["uri"].rstrip("/") + NOQUANT_SUFFIX
    dtype = {"float32": "32-bit", "bfloat16": "16-bit", "float16": "16-bit"}[spec.get("computeDtype", "bfloat16")]
    return [qlora, (Variant(plain["metadata"]["name"], f"LoRA, unquantized ({dtype})"), plain)]


def is_escalation(record: dict) -> bool:
    return ESCALATION_MARKER in record["messages"][-1]["content"]


def hardest_slice(records: Sequence[dict], limit: int) -> list[dict]:
    """The first `limit` held-out escalation tickets, in file order."""
    return [r for r in records if is_escalation(r)][:limit]


def pass_rates(checks: dict[str, Any], replies: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per check and `tone` (every check passes) the fraction of replies that pass.
    `checks` maps a name to `generation.compile_check(check)`."""
    if not replies:
        return {}
    passed = {name: [fn(r, ref) for r, ref in zip(replies, references, strict=True)] for name, fn in checks.items()}
    out = {name: sum(v) / len(v) for name, v in passed.items()}
    out["tone"] = sum(all(row) for row in zip(*passed.values())) / len(replies)
    return out


def slice_report(spec, base_dir: Path, adapter_dir: Path, records: Sequence[dict]) -> dict[str, Any]:
    """Greedy replies of the base and of base + published adapter on `records`, scored by the
    job's own checks the way the trainer's evaluation scores them (same prompts, same reasoning
    stripping). The base is loaded as the job trained on it (quantized for QLoRA)."""
    import torch
    from transformers.utils import logging as hf_logging

    from lora_trainer.data.rendering import reasoning_tags, strip_reasoning
    from lora_trainer.evaluation import generation
    from lora_trainer.evaluation.scoring import generate, load_adapted
    from lora_trainer.model.loading import load_tokenizer

    hf_logging.disable_progress_bar()
    # One thread: greedy decoding of a 128-wide model gains little from a second one, and on busy
    # cores two OpenMP threads spin (measured: 2 min with one thread, >15 min with two, same load).
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(adapter_dir)
    model = load_adapted(spec, base_dir, adapter_dir)
    samples = generation.build_samples(records, tokenizer, len(records), spec.dataset.chat_template_kwargs)
    prompts, refs = [s.prompt for s in samples], [s.reference for s in samples]
    checks = {c.name: generation.compile_check(c) for c in spec.evaluation.gate.checks}
    new, tags = spec.evaluation.max_new_tokens, reasoning_tags(tokenizer)

    def replies() -> list[str]:
        return [strip_reasoning(r, tags) for r in generate(model, tokenizer, prompts, new)]

    with model.disable_adapter():
        base = pass_rates(checks, replies(), refs)
    return {"samples": len(samples), "base": base, "adapter": pass_rates(checks, replies(), refs)}


# --- the table ------------------------------------------------------------------------------------


def _result(obj: dict, name: str) -> dict:
    results = ((obj.get("status") or {}).get("evaluation") or {}).get("results") or []
    return next((r for r in results if r.get("name") == name), {})


def _arrow(base: Optional[float], adapter: Optional[float], pct: bool = False) -> str:
    fmt = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")
    if adapter is None:
        return "-"
    return f"{fmt(base)} -> {fmt(adapter)}" if base is not None else fmt(adapter)


def _mib(n: Optional[float]) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def _kib(n: Optional[float]) -> str:
    return f"{n / 2**10:,.0f} KiB" if n else "-"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) for one variant. `facts`: obj (the LoRATrainingJob), wall_s, progress
    (progress.json), adapter_bytes, slice (slice_report)."""
    obj, progress, sl = facts["obj"], facts.get("progress") or {}, facts.get("slice") or {}
    loss = _result(obj, "evalLoss")
    base, adapter = sl.get("base", {}), sl.get("adapter", {})
    out = [
        ("phase (gate)", f"{obj['status'].get('phase')} ({(obj['status'].get('evaluation') or {}).get('verdict', '-')})"),
        ("wall time (start -> end)", _duration(facts.get("wall_s"))),
        ("peak memory (trainer RSS)", _mib(progress.get("peakMemoryBytes"))),
        ("trainable parameters", f"{progress['trainableParams']:,}" if progress.get("trainableParams") else "-"),
        ("held-out loss, base -> adapter", _arrow(loss.get("base"), loss.get("adapter"))),
        (f"{SLICE_NAME} (n={sl.get('samples', 0)}): tone adherence", _arrow(base.get("tone"), adapter.get("tone"), True)),
    ]
    out += [(f"  {name}", _arrow(base.get(name), adapter.get(name), True))
            for name in adapter if name != "tone"]
    out.append(("adapter size (adapter_model.safetensors)", _kib(facts.get("adapter_bytes"))))
    return out


def table(columns: Sequence[tuple[Variant, dict]]) -> str:
    """One text table, a column per variant."""
    per = [dict(rows(facts)) for _, facts in columns]
    metrics = list(dict.fromkeys(m for facts in columns for m, _ in rows(facts[1])))
    width = max(len(m) for m in metrics)
    cols = [max(len(v.label), *(len(p.get(m, "-")) for m in metrics)) for (v, _), p in zip(columns, per)]
    lines = [f"{'':<{width}}  " + "  ".join(f"{v.label:<{c}}" for (v, _), c in zip(columns, cols))]
    lines += [f"{m:<{width}}  " + "  ".join(f"{p.get(m, '-'):<{c}}" for p, c in zip(per, cols)) for m in metrics]
    return "\n".join(line.rstrip() for line in lines)
