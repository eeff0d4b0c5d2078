"""The tokenized-data cache: a hit yields the very examples a cold prepare builds; any change to
what encoding depends on misses; tampered, foreign or malformed entries are rejected and rebuilt."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import tiny

from lora_operator.api import DatasetSpec
from lora_trainer.data import prepare as prep
from lora_trainer.data import token_cache
from lora_trainer.io.cache import Cache
from lora_trainer.io.storage import LocalStore


def _dataset(path: Path, **over) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": f"file://{path}", "evalFraction": 0.25, **over})


def _snapshot(p: prep.Prepared) -> dict:
    exs = lambda rows: [[(e.ids, e.labels, getattr(e, "line", None)) for e in row] for row in rows]  # noqa: E731
    return {"train": exs(p.train_rows), "eval": exs(p.eval_rows), "examples": [
        (e.ids, e.labels, e.line, e.turn, e.ends) for e in p.train_examples],
        "stats": p.stats(), "n": (p.n_train, p.n_eval, p.train_tokens, p.p95),
        "drops": [(d.line, d.turn, d.reason) for d in p.drops]}


def Spy(monkeypatch):
    """Counts encode_records calls (a hit encodes nothing)."""
    return tiny.CallCounter(monkeypatch, prep, "encode_records")


@pytest.fixture
def data(tmp_path) -> Path:
    return tiny.make_chat_jsonl(tmp_path / "train.jsonl", 24, seed=3)


def _cache(tmp_path, remote: bool = True) -> Cache:
    store = LocalStore(tmp_path / "out")
    return token_cache.token_cache(tmp_path / "work" / "cache", store if remote else None, "job/cache",
                                   write_remote=remote)


def _prepare(ds, tok, tmp_path, cache, seed=7):
    return prep.prepare_data(ds, tok, tmp_path / "work", seed, cache=cache)


def test_a_second_prepare_hits_the_cache_and_yields_identical_examples(tmp_path, data, tiny_tokenizer,
                                                                       monkeypatch):
    spy = Spy(monkeypatch)
    cold = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path))
    assert spy.calls == 2
    warm = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path))
    assert spy.calls == 2  # nothing encoded again
    assert _snapshot(warm) == _snapshot(cold)
    assert list((tmp_path / "out" / "job" / "cache").iterdir())  # also under the output prefix


def test_a_new_pod_finds_the_entry_under_the_output_prefix(tmp_path, data, tiny_tokenizer, monkeypatch):
    cold = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path))
    for f in (tmp_path / "work" / "cache").iterdir():  # the work dir (emptyDir) is gone
        f.unlink()
    spy = Spy(monkeypatch)
    warm = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path))
    assert spy.calls == 0 and _snapshot(warm) == _snapshot(cold)


@pytest.mark.parametrize("change", ["seed", "data", "trainOnPrompt", "chatTemplateKwargs", "format",
                                    "tokenizer", "template"])
def test_changing_any_key_input_misses(tmp_path, data, tiny_tokenizer, monkeypatch, change):
    ds, tok, seed = _dataset(data), tiny_tokenizer, 7
    _prepare(ds, tok, tmp_path, _cache(tmp_path))
    if change == "seed":
        seed = 8
    elif change == "data":
        data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    elif change == "trainOnPrompt":
        ds = _dataset(data, trainOnPrompt=True)
    elif change == "chatTemplateKwargs":
        ds = _dataset(data, chatTemplateKwargs={"enable_thinking": False})
    elif change == "format":
        completion = tmp_path / "c.jsonl"
        completion.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                      for i in range(8)))
        ds = _dataset(completion, format="completion")
    elif change == "tokenizer":
        tok = copy.deepcopy(tok)
        tok.add_tokens(["<|new|>"])
    else:
        tok = copy.deepcopy(tok)
        tok.chat_template = tok.chat_template.replace("\n", "\n\n", 1)
    spy = Spy(monkeypatch)
    _prepare(ds, tok, tmp_path, _cache(tmp_path), seed=seed)
    assert spy.calls == 2


def test_settings_applied_after_the_cache_still_take_effect(tmp_path, data, tiny_tokenizer, monkeypatch):
    """maxSeqLength, onOverlong and packing run after the cache: a hit with new values of them gives
    what a cold prepare with those values gives."""
    _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path))
    over = {"maxSeqLength": 60, "onOverlong": "drop", "packing": False}
    spy = Spy(monkeypatch)
    warm = _prepare(_dataset(data, **over), tiny_tokenizer, tmp_path, _cache(tmp_path))
    assert spy.calls == 0
    cold = _prepare(_dataset(data, **over), tiny_tokenizer, tmp_path / "cold", None)
    assert _snapshot(warm) == _snapshot(cold) and warm.max_seq_length == 60 and warm.dropped


def _entry(tmp_path) -> tuple[Path, Path]:
    d = tmp_path / "work" / "cache"
    [payload] = d.glob("tokens-*.safetensors")
    return payload, payload.with_suffix(".json")


def _tamper_ids(payload: Path, manifest: Path) -> None:
    """Rewrite a token id out of the vocabulary and fix up the digests: only the content checks
    can catch it."""
    import hashlib

    import numpy as np
    from safetensors.numpy import load, save

    raw = payload.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + size])["__metadata__"]
    arrays = load(raw)
    arrays["train.ids"] = arrays["train.ids"].copy()
    arrays["train.ids"][0] = 10**9
    new = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    payload.write_bytes(new)
    m = json.loads(manifest.read_text())
    m.update(sha256=hashlib.sha256(new).hexdigest(), bytes=len(new))
    manifest.write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["flipped byte", "foreign key", "not json", "nan", "valid digest, bad ids"])
def test_a_tampered_entry_is_rejected_and_rebuilt(tmp_path, data, tiny_tokenizer, monkeypatch, caplog, how):
    cold = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path, remote=False))
    payload, manifest = _entry(tmp_path)
    if how == "flipped byte":
        raw = bytearray(payload.read_bytes())
        raw[-1] ^= 1
        payload.write_bytes(bytes(raw))
    elif how == "foreign key":
        m = json.loads(manifest.read_text())
        m["key"] = "0" * 64
        manifest.write_text(json.dumps(m))
    elif how == "not json":
        manifest.write_bytes(b"\x80not json")
    elif how == "nan":
        manifest.write_text(manifest.read_text().replace('"format": 1', '"format": NaN').replace(
            '"format":1', '"format":NaN'))
    else:
        _tamper_ids(payload, manifest)
    spy = Spy(monkeypatch)
    with caplog.at_level(logging.WARNING):
        rebuilt = _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path, remote=False))
    assert spy.calls == 2, "a rejected entry must be rebuilt, not used"
    assert "ignoring the tokens cache entry" in caplog.text
    assert _snapshot(rebuilt) == _snapshot(cold)
    spy.calls = 0
    _prepare(_dataset(data), tiny_tokenizer, tmp_path, _cache(tmp_path, remote=False))
    assert spy.calls == 0  # the rebuilt entry replaced the bad one


def test_an_entry_copied_under_another_key_is_refused(tmp_path, data, tiny_tokenizer, monkeypatch):
    """A valid entry of other inputs, renamed (manifest key edited) to this key, is still refused:
    the payload names its own key."""
    other = tiny.make_chat_jsonl(tmp_path / "other.jsonl", 24, seed=9)
    _prepare(_dataset(other), tiny_tokenizer, tmp_path, _cache(tmp_path, remote=False))
    payload, manifest = _entry(tmp_path)
    ds, keys, real_key = _dataset(data), [], token_cache.encoding_key
    monkeypatch.setattr(token_cache, "encoding_key", lambda *a, **kw: keys.append(real_key(*a, **kw)) or keys[-1])
    _prepare(ds, tiny_tokenizer, tmp_path / "probe", _cache(tmp_path / "probe", remote=False))  # learn the key
    key = keys[-1]
    m = json.loads(manifest.read_text())
    m["key"] = key
    (tmp_path / "work" / "cache" / f"tokens-{key}.json").write_text(json.dumps(m))
    (tmp_path / "work" / "cache" / f"tokens-{key}.safetensors").write_bytes(payload.read_bytes())
    spy = Spy(monkeypatch)
    _prepare(ds, tiny_tokenizer, tmp_path, _cache(tmp_path, remote=False))
    assert spy.calls == 2
