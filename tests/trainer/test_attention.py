"""Per-example attention for packed rows equals transformers' masked sdpa: outputs and gradients,
with grouped-query heads, several rows, a padding tail, and where it must fall back (a sliding
window shorter than an example)."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lora_trainer.data.packing import collate_packed
from lora_trainer.data.records import Example
from lora_trainer.model import attention
from lora_trainer.model.loss import sum_ce


def _model(cls, config_cls, impl, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        attn_implementation=impl, **extra)
    return cls(config)


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ex(n):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        return Example(ids, [-100] + ids[1:])

    # two rows of different fill (a padding tail on both), three and two examples
    return [[ex(30), ex(17), ex(41)], [ex(25), ex(50)]], 100


def _loss_and_grads(model, batch, segments):
    model.zero_grad()
    loss = sum_ce(model, batch.model_inputs(segments=segments), batch.labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls,config_cls,extra", [
    (LlamaForCausalLM, LlamaConfig, {}),
    (MistralForCausalLM, MistralConfig, {"sliding_window": 64}),  # longer than every example
])
def test_per_example_attention_equals_masked_sdpa_in_loss_and_gradients(cls, config_cls, extra):
    attention.register()
    rows, row_len = _rows()
    batch = collate_packed(rows, row_len, pad_id=0)
    plain = _model(cls, config_cls, "sdpa", **extra).train()
    packed = _model(cls, config_cls, attention.PACKED_SDPA, **extra).train()
    packed.load_state_dict(plain.state_dict())
    want_loss, want = _loss_and_grads(plain, batch, segments=False)
    got_loss, got = _loss_and_grads(packed, batch, segments=True)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-4, rtol=1e-5)
    assert want.keys() == got.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_segments_are_used_only_when_asked_and_trimming_the_padding_changes_nothing():
    attention.register()
    rows, row_len = _rows(seed=1)
    batch = collate_packed(rows[:1], row_len, pad_id=0)  # one row of 88 tokens + 12 padding
    trimmed = batch.trimmed()
    assert trimmed.input_ids.shape[1] == 88 < batch.input_ids.shape[1]
    assert trimmed.n_targets == batch.n_targets and trimmed.n_tokens == batch.n_tokens
    model = _model(LlamaForCausalLM, LlamaConfig, attention.PACKED_SDPA).eval()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(k.get("attn_mask") is None)
        return real(*a, **k)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        full = sum_ce(model, batch.model_inputs(), batch.labels)
        assert calls == [False, False]  # one masked call per layer
        calls.clear()
        short = sum_ce(model, trimmed.model_inputs(segments=True), trimmed.labels)
        assert calls == [True] * 6  # three examples x two layers, no mask
    torch.testing.assert_close(short, full, atol=1e-4, rtol=1e-5)


def test_a_sliding_window_shorter_than_an_example_falls_back_to_the_masked_path():
    attention.register()
    rows, row_len = _rows(seed=2)  # examples of up to 50 tokens
    batch = collate_packed(rows, row_len, pad_id=0)
    plain = _model(MistralForCausalLM, MistralConfig, "sdpa", sliding_window=20).eval()
    packed = _model(MistralForCausalLM, MistralConfig, attention.PACKED_SDPA, sliding_window=20).eval()
    packed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        want = sum_ce(plain, batch.model_inputs(), batch.labels)
        got = sum_ce(packed, batch.model_inputs(segments=True), batch.labels)
        # Control: causal attention over a whole example (no window) is a different model.
        no_window = _model(MistralForCausalLM, MistralConfig, attention.PACKED_SDPA, sliding_window=None).eval()
        no_window.load_state_dict(plain.state_dict())
        other = sum_ce(no_window, batch.model_inputs(segments=True), batch.labels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(other, want, atol=1e-3)


def test_generation_with_the_packed_implementation_equals_sdpa(tiny_base):
    from lora_trainer.model.loading import load_base, load_tokenizer

    tok = load_tokenizer(tiny_base)
    ours = load_base(tiny_base, "none", False, "float32", torch.device("cpu")).eval()
    assert ours.config._attn_implementation == attention.PACKED_SDPA
    plain = LlamaForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa").eval()
    prompt = tok.apply_chat_template(tiny.chat_examples(1, seed=3)[0]["messages"][:1], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert ours.generate(**prompt, **kw, use_cache=True).tolist() == plain.generate(**prompt, **kw).tolist()


@pytest.mark.parametrize("segments", [((0, 5), (7, 12)), ((2, 9),), ((0, 9), (9, 20))],
                         ids=["gap", "not-from-0", "past-the-row"])
def test_segments_that_do_not_tile_the_row_take_the_masked_path(segments, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "_plain", lambda *a, **k: calls.append(1) or ("plain", None))
    q = torch.randn(1, 2, 16, 8)
    out = attention.packed_sdpa_forward(torch.nn.Module(), q, q, q, None, packed_segments=(segments,))
    assert out[0] == "plain" and calls == [1]
    tiled = attention.packed_sdpa_forward(torch.nn.Module(), q, q, q, None, packed_segments=(((0, 5), (5, 12)),))
    assert tiled[0].shape == (1, 16, 2, 8) and calls == [1]
