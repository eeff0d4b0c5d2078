"""Which of the decoder's linear layers `lora.targetModules` adapts, checked before training.

PEFT matches a name in target_modules against the end of each module's dotted path and silently
ignores names that match nothing as long as one name matches. Architectures differ in naming:
Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so the classic attention list
adapts only `o_proj` there. So:
  * a name that matches no linear layer fails the job (a typo or the wrong family): exit 2;
  * names that leave some kinds of decoder linear layers unadapted are reported (log and
    progress.json `warnings`) with what they miss; `all-linear` covers everything but the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_operator.api import ALL_LINEAR, SpecError


@dataclass(frozen=True)
class Coverage:
    kinds: tuple[str, ...]  # last name component of every linear layer of the decoder, sorted
    covered: tuple[str, ...]  # kinds with at least one adapted layer
    adapted: int  # adapted linear layers
    total: int  # linear layers of the decoder

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(k for k in self.kinds if k not in self.covered)

    def warning(self) -> str | None:
        if not self.missing:
            return None
        return (f"lora.targetModules adapts {self.adapted} of the decoder's {self.total} linear layers; "
                f"not adapted: {', '.join(self.missing)} (all-linear covers them all)")


def _decoder_linears(model) -> dict[str, str]:
    """Dotted path -> last component, for every linear layer of the decoder (not the head)."""
    import torch

    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    return {name: name.rsplit(".", 1)[-1] for name, mod in inner.named_modules()
            if isinstance(mod, torch.nn.Linear) and name}


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def check_targets(model, targets: list[str]) -> Coverage:
    """Coverage of `targets` over the base model's decoder; raises SpecError for a dead name."""
    linears = _decoder_linears(model)
    kinds = tuple(sorted(set(linears.values())))
    if list(targets) == [ALL_LINEAR]:
        return Coverage(kinds, kinds, len(linears), len(linears))
    dead = [t for t in targets if not any(_matches(p, t) for p in linears)]
    if dead:
        raise SpecError("lora.targetModules", f"{', '.join(dead)} match no linear layer of this "
                        f"model's decoder; its linear layers are: {', '.join(kinds)}")
    adapted = [p for p in linears if any(_matches(p, t) for t in targets)]
    covered = tuple(sorted({linears[p] for p in adapted}))
    return Coverage(kinds, covered, len(adapted), len(linears))
