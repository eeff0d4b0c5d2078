"""Per family: loading (attention kernel), packed == unpacked logits, chunked CE == full CE, and
the LoRA target coverage report."""

from __future__ import annotations

import families as F
import pytest
import torch

from lora_operator.api import SpecError
from lora_trainer.data.packing import collate_packed
from lora_trainer.data.rendering import render_chat, token_labels
from lora_trainer.model import loading as m
from lora_trainer.model import loss
from lora_trainer.model.targets import check_targets

NAMES = list(F.FAMILIES)


def _examples(tok, n=3):
    out = []
    for k in range(n):
        shape = "multi" if k % 2 else "single"
        for r in render_chat(tok, F.conversation(shape, seed=k)):
            out.append(token_labels(tok, r))
    return out


def _load(path, attn="auto"):
    return m.load_base(path, "none", False, "float32", torch.device("cpu"), attn=attn).eval()


@pytest.mark.parametrize("family", NAMES)
def test_attention_kernel_is_sdpa_where_supported_and_packed_logits_equal_unpacked(family_base, family):
    from lora_trainer.data.records import Example
    from lora_trainer.model.attention import PACKED_SDPA

    path = family_base(family)
    want = "eager" if family == "gemma2" else "sdpa"
    assert m.attn_implementation(path) == want
    model = _load(path)
    assert model.config._attn_implementation == ("eager" if want == "eager" else PACKED_SDPA)
    tok = m.load_tokenizer(path)
    exs = [Example(ids, labels) for ids, labels in _examples(tok)]
    row_len = sum(len(e) for e in exs) + 3
    packed = collate_packed([exs], row_len, tok.pad_token_id)
    with torch.no_grad():
        # The mask transformers derives from restarting positions, and the per-example attention
        # the training forward asks for with the examples' bounds: both equal each example alone.
        for segments in (False, True):
            logits = model(**packed.model_inputs(segments=segments)).logits[0]
            at = 0
            for ex in exs:
                alone = model(input_ids=torch.tensor([ex.ids]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[at:at + len(ex)], alone, atol=2e-5, rtol=1e-4)
                at += len(ex)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("family", NAMES)
def test_chunked_cross_entropy_equals_full_logits_loss_and_gradients(family_base, family, recompute, monkeypatch):
    from peft import LoraConfig, get_peft_model

    # tiny vocabularies give small chunks, which are kept; 0 forces the checkpointed path
    monkeypatch.setattr(loss, "CHECKPOINT_MIN_ELEMENTS", 0 if recompute else 1 << 30)

    path = family_base(family)
    tok = m.load_tokenizer(path)
    model = get_peft_model(_load(path).train(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for mod in model.modules():  # non-zero B so every LoRA weight gets a gradient
        for lin in getattr(mod, "lora_B", {}).values():
            torch.nn.init.normal_(lin.weight, std=0.1)
    ids, labels = _examples(tok, 1)[0]
    inputs, lab = {"input_ids": torch.tensor([ids]), "use_cache": False}, torch.tensor([labels])
    params = [p for p in model.parameters() if p.requires_grad]
    full = loss.full_ce(model, inputs, lab)
    want = torch.autograd.grad(full, params)
    chunked = loss.sum_ce(model, inputs, lab, chunk=3)
    got = torch.autograd.grad(chunked, params)
    assert loss.chunked_supported(model)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_classic_attention_targets_on_phi3_report_the_fused_projections_they_miss(family_base):
    model = _load(family_base("phi35"))
    with pytest.raises(SpecError, match="q_proj, k_proj, v_proj match no linear layer"):
        check_targets(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    cov = check_targets(model, ["o_proj"])
    assert cov.missing == ("down_proj", "gate_up_proj", "qkv_proj")
    assert "adapts 2 of the decoder's 8 linear layers" in cov.warning()
    assert check_targets(model, ["all-linear"]).warning() is None


def test_all_linear_adapts_every_decoder_linear_layer_and_not_the_head(family_base):
    from peft import LoraConfig, get_peft_model

    model = _load(family_base("phi35"))
    cov = check_targets(model, ["all-linear"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n.rsplit(".", 1)[-1] for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == set(cov.kinds) == set(F.FAMILIES["phi35"].linear)


def test_gradient_checkpointing_is_on_by_default_for_quantized_bases_only(family_base):
    assert m.gradient_checkpointing(None, "nf4") and not m.gradient_checkpointing(None, "none")
    assert not m.gradient_checkpointing(False, "nf4") and m.gradient_checkpointing(True, "none")
    model = m.load_base(family_base("llama31"), "none", False, "float32", torch.device("cpu"), checkpointing=True)
    assert model.is_activation_checkpointing


def test_attention_kernel_can_be_overridden_in_the_spec(family_base):
    assert m.attn_implementation(family_base("gemma2"), "sdpa") == "sdpa"
    assert _load(family_base("qwen25"), attn="eager").config._attn_implementation == "eager"
