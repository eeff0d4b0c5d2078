"""The base-evaluation cache: a second evaluation reuses the base's numbers and replies (no base
forward, no base generation) and reports exactly what a full one reports; a changed setting
misses; an entry that is not strict JSON, not finite or does not match what is scored now is
recomputed, never used."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import tiny

sys.path.insert(0, str(Path(__file__).parent))
import test_evaluation_support as world

from lora_trainer.evaluation import base_cache as bc
from lora_trainer.evaluation import scoring
from lora_trainer.io.cache import Cache


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return world.build_world(tmp_path_factory.mktemp("support"))


@pytest.fixture(scope="module")
def model(w):
    spec = world.make_spec(w["root"])
    return scoring.load_adapted(spec, w["base"], w["adapter"])


def BaseSpy(monkeypatch):
    """Counts base measurements (scoring with the adapter disabled)."""
    return tiny.CallCounter(monkeypatch, scoring, "_score_base")


def _spec(w):
    """The support world's spec with fewer, shorter generations (these tests count, not judge)."""
    spec = world.make_spec(w["root"])
    spec.evaluation.max_samples, spec.evaluation.max_new_tokens = 3, 6
    return spec


def _evaluate(w, model, cache, spec=None, regression=True):
    spec = spec or _spec(w)
    reg = world.chat_examples(4, seed=3) if regression else None
    return scoring.evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"], model=model,
                            regression_records=reg, base_cache=cache)


def _cache(tmp_path) -> Cache:
    return bc.base_cache(tmp_path / "cache")


def _comparable(report) -> dict:
    d = report.to_dict()
    return {k: d[k] for k in ("base", "adapter", "checks", "regression", "numSamples", "gate", "generations")}


@pytest.mark.slow
def test_a_second_evaluation_reuses_the_base_and_reports_the_same(w, model, tmp_path, monkeypatch):
    spy = BaseSpy(monkeypatch)
    cold = _evaluate(w, model, _cache(tmp_path))
    warm = _evaluate(w, model, _cache(tmp_path))
    assert spy.calls == 1
    assert _comparable(warm) == _comparable(cold)
    uncached = _evaluate(w, model, None)
    assert _comparable(uncached) == _comparable(cold)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["maxNewTokens", "maxSamples", "seed", "records", "revision",
                                    "regression", "chatTemplateKwargs"])
def test_a_changed_setting_misses(w, model, tmp_path, monkeypatch, change):
    _evaluate(w, model, _cache(tmp_path))
    spy = BaseSpy(monkeypatch)
    spec, regression, records = _spec(w), True, w["records"]
    if change == "maxNewTokens":
        spec.evaluation.max_new_tokens = 5
    elif change == "maxSamples":
        spec.evaluation.max_samples = 2
    elif change == "seed":
        spec.training.seed = 8
    elif change == "records":
        records = records[:-1]
    elif change == "revision":
        spec.base_model.revision = "sha256:" + "1" * 64
    elif change == "regression":
        regression = False
    else:
        spec.dataset.chat_template_kwargs = {"enable_thinking": False}
    scoring.evaluate(spec, w["base"], w["adapter"], records, w["tokenizer"], model=model,
                     regression_records=world.chat_examples(4, seed=3) if regression else None,
                     base_cache=_cache(tmp_path))
    assert spy.calls == 1


def _payload(tmp_path):
    [path] = (tmp_path / "cache").glob("base-eval-*.result.json")
    return path


def _rewrite(path, doc_or_bytes) -> None:
    """Replace the payload and fix the manifest's digest: only the content checks can refuse it."""
    import hashlib

    raw = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    path.write_bytes(raw)
    manifest = path.with_name(path.name.replace(".result.json", ".json"))
    m = json.loads(manifest.read_text())
    m.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    manifest.write_text(json.dumps(m))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped byte", "NaN token", "negative loss", "wrong token count",
                                 "missing replies", "extra field", "not an object"])
def test_an_unusable_entry_is_recomputed_not_used(w, model, tmp_path, monkeypatch, caplog, how):
    cold = _evaluate(w, model, _cache(tmp_path))
    path = _payload(tmp_path)
    doc = json.loads(path.read_text())
    if how == "flipped byte":
        raw = bytearray(path.read_bytes())
        raw[5] ^= 1
        path.write_bytes(bytes(raw))  # digest no longer matches
    elif how == "NaN token":
        _rewrite(path, path.read_bytes().replace(str(doc["loss"]["loss"]).encode(), b"NaN"))
    elif how == "negative loss":
        doc["loss"]["loss"] = -1.0
        _rewrite(path, doc)
    elif how == "wrong token count":
        doc["loss"]["tokens"] += 1
        _rewrite(path, doc)
    elif how == "missing replies":
        doc["replies"] = doc["replies"][:-1]
        _rewrite(path, doc)
    elif how == "extra field":
        doc["passed"] = True
        _rewrite(path, doc)
    else:
        _rewrite(path, b"[1, 2]")
    spy = BaseSpy(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = _evaluate(w, model, _cache(tmp_path))
    assert spy.calls == 1, "an unusable entry must be recomputed"
    assert "ignoring the base-eval cache entry" in caplog.text
    assert _comparable(again) == _comparable(cold)


@pytest.mark.slow
def test_cached_base_numbers_are_the_ones_reported(w, model, tmp_path):
    """The entry really is what the report uses (a valid entry with other numbers shows through)."""
    _evaluate(w, model, _cache(tmp_path))
    path = _payload(tmp_path)
    doc = json.loads(path.read_text())
    doc["loss"]["loss"] = 9.5
    doc["replies"] = ["x"] * len(doc["replies"])
    _rewrite(path, doc)
    report = _evaluate(w, model, _cache(tmp_path))
    assert report.base.loss == 9.5 and report.generations[0]["base"] == "x"


def test_non_finite_base_results_are_not_kept():
    results = bc.BaseResults(bc.BaseLoss(float("nan"), 3), None, None)
    assert bc.encode(results) is None
    assert bc.encode(bc.BaseResults(bc.BaseLoss(1.5, 3), None, ["a"])) is not None


@pytest.mark.parametrize("payload", [b'{"loss": {"loss": Infinity, "tokens": 3}, "regression": null, "replies": null}',
                                     b'{"loss": {"loss": true, "tokens": 3}, "regression": null, "replies": null}',
                                     b'{"loss": {"loss": 1.0, "tokens": 3}, "regression": {"loss": 1.0, "tokens": 2}, '
                                     b'"replies": null}',
                                     b'{"loss": {"loss": 1.0, "tokens": 3}, "regression": null, "replies": ["a"]}',
                                     b'\xff'])
def test_decode_refuses_what_does_not_match_this_evaluation(payload):
    with pytest.raises(ValueError):
        bc.decode(payload, tokens=3, reg_tokens=None, n_replies=None)
