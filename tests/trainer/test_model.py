"""Base model: pinned revisions only; NF4 (QLoRA) and fp32 LoRA both train for real on the CPU."""

from __future__ import annotations

import shutil

import pytest
import tiny
import torch

from lora_trainer.data.packing import collate_packed, make_rows
from lora_trainer.data.records import encode_all
from lora_trainer.io.storage import fingerprint_dir
from lora_trainer.model import loading as m
from lora_trainer.model.lora import add_lora, param_counts


def test_unpinned_base_is_refused(tiny_base, tmp_path):
    with pytest.raises(m.RevisionError, match="not pinned"):
        m.resolve_base(f"file://{tiny_base}", "main", tmp_path)
    with pytest.raises(m.RevisionError, match="40-hex commit"):
        m.resolve_base("hf://org/model", "main", tmp_path)


def test_base_whose_files_do_not_match_the_revision_is_refused(tiny_base, tmp_path):
    copy = shutil.copytree(tiny_base, tmp_path / "store" / "models" / "b")
    good = fingerprint_dir(copy)
    assert m.resolve_base("s3://models/b", good, tmp_path / "w", storage_dir=tmp_path / "store")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(m.RevisionError, match="does not match its pinned revision"):
        m.resolve_base("s3://models/b", good, tmp_path / "w", storage_dir=tmp_path / "store")


def test_hub_base_offline_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network waits
    with pytest.raises(m.RevisionError, match="cannot fetch hf://org/name@"):
        m.resolve_base("hf://org/name", "a" * 40, tmp_path)


def _train_steps(model, tokenizer, steps=6, lr=1e-2, autocast=None):
    exs = encode_all(tokenizer, tiny.chat_examples(8, seed=4), "chat", False)
    rows, row_len = make_rows(exs, max(len(e) for e in exs), packing=True)
    batch = collate_packed(rows, row_len, tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        # Autocast around the forward only: its cast cache would keep stale bf16 LoRA weights.
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out = model(**batch.model_inputs(), labels=batch.labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nf4_base_is_4bit_and_lora_trains(tiny_base, tiny_tokenizer, dtype):
    import bitsandbytes as bnb

    base = m.load_base(tiny_base, "nf4", True, dtype, torch.device("cpu"))
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.nested  # double quant
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    trainable, total = param_counts(model)
    assert 0 < trainable < total
    assert isinstance(model.base_model.model.model.layers[1].mlp.down_proj.base_layer,
                      bnb.nn.Linear4bit)
    losses = _train_steps(model, tiny_tokenizer,
                          autocast=torch.bfloat16 if dtype == "bfloat16" else None)
    assert losses[-1] < losses[0] - 0.05, losses


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch.model_inputs(), labels=batch.labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_an_eval_forward_between_steps_leaves_nf4_lora_gradients_unchanged(tiny_base, tiny_tokenizer):
    # Fails without keep_4bit_weights_trainable on CPUs with AVX512-BF16 (bitsandbytes repacks).
    import bitsandbytes as bnb

    base = m.load_base(tiny_base, "nf4", True, "float32", torch.device("cpu"))
    layers = [x for x in base.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert layers and not any(x.support_avx512bf16_for_cpu for x in layers)
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    exs = encode_all(tiny_tokenizer, tiny.chat_examples(4, seed=2), "chat", False)
    rows, row_len = make_rows(exs, max(len(e) for e in exs), packing=True)
    batch = collate_packed(rows, row_len, tiny_tokenizer.pad_token_id)
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():  # what the in-loop held-out loss does
        model(**batch.model_inputs())
    after = _lora_grads(model, batch)
    for name, grad in before.items():
        assert torch.allclose(grad, after[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_fp32_lora_trains_only_the_adapter(tiny_base, tiny_tokenizer):
    base = m.load_base(tiny_base, "none", True, "float32", torch.device("cpu"))
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    losses = _train_steps(model, tiny_tokenizer)
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.equal(frozen, model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)


def test_tiny_tokenizer_ends_turns_with_eos_only_when_asked():
    from lora_trainer.model.tiny_tokenizer import IM_END, build_chatml_tokenizer

    texts = tiny.default_corpus(n=20)
    tests_tok = build_chatml_tokenizer(texts, 300)
    demo_tok = build_chatml_tokenizer(texts, 300, eos_token=IM_END, model_max_length=512)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for tok in (tests_tok, demo_tok):
        assert tok.apply_chat_template(chat, tokenize=False) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    assert tests_tok.eos_token == "<|eos|>" and tests_tok.convert_tokens_to_ids(IM_END) != tests_tok.eos_token_id
    assert demo_tok.eos_token_id == demo_tok.convert_tokens_to_ids(IM_END) and demo_tok.model_max_length == 512
    with pytest.raises(ValueError, match="eos_token"):
        build_chatml_tokenizer(texts, 300, eos_token="</s>")
