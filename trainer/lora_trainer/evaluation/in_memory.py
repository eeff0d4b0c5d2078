"""Evaluating the adapter on the model training left in memory, instead of loading the base again.

After training in this process the recipe's PeftModel already holds the base exactly as
`scoring.load_adapted` would load it (same files, quantization, attention, k-bit preparation), so
reloading costs a full model load for nothing. The checkpoint's adapter weights (the verified files
that are published) are always loaded into it, whether or not the best step is the last one, so
the adapter scored is byte for byte the adapter published.

Reuse is limited to the cases where the numbers equal the reload path's: on CUDA (evaluation runs
in spec.computeDtype, as training did) and on CPU only for float32 training (CPU evaluation runs in
float32; a bfloat16-trained base would score differently). Otherwise `scoring` reloads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def reusable(spec, device) -> bool:
    """Whether scoring the trained model gives the reload path's numbers (module docstring)."""
    return device.type == "cuda" or spec.compute_dtype == "float32"


def adopt(model, adapter_dir: Path, spec) -> Optional[object]:
    """`model` (an unwrapped PeftModel) with the adapter of `adapter_dir` loaded, ready to score;
    None when it cannot stand in for a reload (then the caller reloads)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    if not reusable(spec, device):
        log.info("evaluating on a reloaded base (trained in %s on %s)", spec.compute_dtype, device.type)
        return None
    weights = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS), device=str(device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        log.warning("the checkpoint's adapter does not fit the trained model (%d unexpected, %d missing "
                    "keys); evaluating on a reloaded base", len(result.unexpected_keys), len(missing))
        return None
    log.info("evaluating the adapter on the model in memory (no base reload)")
    return model.eval()
