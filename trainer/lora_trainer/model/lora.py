"""Adding LoRA adapters to the frozen base (PEFT), and counting what is trained.

A LoRA variant (DoRA, rsLoRA) is one more `LoraConfig` argument here, driven by a spec field.
Plain LoRA layers run through `fused_lora` (one autograd node per projection); the adapter's
parameters, names and saved files are PEFT's own.
"""

from __future__ import annotations

from . import fused_lora


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    fused_lora.fuse(model)
    return model


def param_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
