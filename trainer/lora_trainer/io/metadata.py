"""lora-metadata.json: the provenance record of one published artifact set.

It is written last (see export.publish): its presence means every file it lists under `files`
(relative path -> sha256) is in place. Readers should treat an output prefix without it as
incomplete and may verify the listed digests.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

from .progress import now_rfc3339

SCHEMA_VERSION = 1
FILENAME = "lora-metadata.json"


def trainer_version() -> str:
    try:
        from importlib.metadata import version

        return version("lora-operator")
    except Exception:
        import lora_trainer

        return getattr(lora_trainer, "__version__", "unknown")


LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def library_versions(names=LIBRARIES) -> dict[str, Optional[str]]:
    """Installed versions of `names` (default: the libraries that shape the weights; None: not
    installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def chat_template_sha256(tokenizer) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    if not isinstance(template, str):  # named templates: hash a stable rendering
        import json

        template = json.dumps(template, sort_keys=True)
    return "sha256:" + hashlib.sha256(template.encode("utf-8")).hexdigest()


def build_metadata(spec, report, *, adapter_config: dict, tokenizer, artifacts: dict[str, str],
                   files: dict[str, str], dataset_hashes: dict[str, str], run_id: str,
                   started_at: Optional[str] = None, warnings: Optional[list[str]] = None,
                   data: Optional[dict[str, Any]] = None, vllm: Optional[dict[str, Any]] = None,
                   world_size: int = 1) -> dict[str, Any]:
    """The metadata document. `spec` is the resolved LoRATrainingJobSpec; `report` the EvalReport
    (with its `merged` verification when merged weights were exported); `data` what data
    preparation resolved (maxSeqLength, dropped and truncated examples); `vllm` the serving check;
    `world_size` the training processes of the run (rank 0 writes: `distributed.rank` is 0)."""
    targets = adapter_config.get("target_modules")
    return {
        "schemaVersion": SCHEMA_VERSION,
        "runId": run_id,
        "baseModel": {"uri": spec.base_model.uri, "revision": spec.base_model.revision},
        "datasetHashes": dict(dataset_hashes),
        "seed": spec.training.seed,
        "lora": {
            "rank": adapter_config.get("r"),
            "alpha": adapter_config.get("lora_alpha"),
            "scale": adapter_config["lora_alpha"] / adapter_config["r"],
            # PEFT may expand all-linear into dotted paths per layer; the kinds of layer are what matter.
            "targetModules": (sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, (list, set))
                              else targets),
            "dropout": adapter_config.get("lora_dropout"),
        },
        "quantization": spec.quantization,
        "computeDtype": spec.compute_dtype,
        "checkpointStep": report.checkpoint_step,
        "distributed": {"rank": 0, "worldSize": world_size, "nodes": spec.resources.nodes},
        "eval": report.to_dict(),
        "spec": spec.to_wire(),  # every hyperparameter, defaults resolved
        "data": dict(data or {}),
        "vllm": dict(vllm or {}),
        "trainerVersion": trainer_version(),
        "libraries": library_versions(),
        "chatTemplateSha256": chat_template_sha256(tokenizer),
        "artifacts": dict(artifacts),
        "files": dict(files),
        "warnings": list(warnings or []),
        "timestamps": {"startedAt": started_at, "publishedAt": now_rfc3339()},
    }
