"""Pure pieces of "trust what ships": bounded patterns, offline schemas, strict JSON, job identity,
checkpoint manifests and loading without code execution."""

from __future__ import annotations

import json
import math
import time

import pytest

from lora_trainer.evaluation import patterns
from lora_trainer.io import identity, strictjson
from lora_trainer.io.storage import file_sha256
from lora_trainer.model import verify

# --- bounded patterns -----------------------------------------------------------------------------

LONG_OUTPUT = " ".join(["abcde"] * 400) + "!"  # re needs ~6 s at 12 words and 4x more per word


def test_catastrophic_pattern_on_long_output_runs_in_linear_time():
    p = patterns.BoundedPattern(r"^(\w+\s?)+$")
    t0 = time.perf_counter()
    assert p.search(LONG_OUTPUT) is False and p.engine == "re2"
    assert p.search("two words") is True
    assert time.perf_counter() - t0 < 1.0


def test_pattern_re2_cannot_run_gets_a_time_limit_and_reports_the_timeout():
    p = patterns.BoundedPattern(r"^(\w|\w\w)+(?<!x)$", timeout_s=0.05)  # lookbehind: not RE2
    assert p.engine == "regex"
    assert p.search("abc") is True
    t0 = time.perf_counter()
    assert p.search("a" * 60 + "!") is None, "a timed-out search is neither match nor non-match"
    assert time.perf_counter() - t0 < 5.0


def test_invalid_pattern_is_refused_when_compiled():
    with pytest.raises(patterns.PatternError, match="invalid pattern"):
        patterns.BoundedPattern("(unclosed")


def test_json_schema_with_a_remote_ref_is_refused_and_nothing_is_fetched(monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("a schema check reached for the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(patterns.PatternError, match="remote \\$ref"):
        patterns.offline_validator({"$ref": "https://example.com/schema.json"})
    local = patterns.offline_validator({"$defs": {"n": {"type": "integer"}}, "type": "object",
                                        "properties": {"a": {"$ref": "#/$defs/n"}}})
    assert patterns.schema_valid(local, {"a": 1}) and not patterns.schema_valid(local, {"a": "x"})


# --- strict JSON ----------------------------------------------------------------------------------


def test_non_finite_numbers_become_null_and_the_output_is_strict_json():
    doc = {"loss": math.nan, "eta": math.inf, "rows": [1.5, -math.inf, {"x": math.nan}], "n": 3}
    text = strictjson.dumps(doc, sort_keys=True)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None, "eta": None, "rows": [1.5, None, {"x": None}], "n": 3}


# --- job identity ---------------------------------------------------------------------------------


def _spec(**over):
    from overrides import with_overrides

    from lora_operator.api import parse_spec

    spec = {"baseModel": {"uri": "s3://models/b", "revision": "sha256:" + "0" * 64},
            "dataset": {"train": "s3://data/train.jsonl"}, "lora": {"rank": 4},
            "training": {"epochs": 1, "learningRate": 0.005}, "output": {"uri": "s3://out/job"}}
    return parse_spec(with_overrides(spec, **over))


def test_fingerprint_changes_with_data_and_training_settings_but_not_with_retention():
    spec = _spec()
    fp = identity.fingerprint(spec, {"s3://data/train.jsonl": "sha256:1"})
    assert fp == identity.fingerprint(_spec(), {"s3://data/train.jsonl": "sha256:1"})
    assert fp != identity.fingerprint(spec, {"s3://data/train.jsonl": "sha256:2"})
    assert fp != identity.fingerprint(_spec(**{"training.learningRate": 0.01}), {"s3://data/train.jsonl": "sha256:1"})
    assert fp != identity.fingerprint(_spec(**{"lora.rank": 8}), {"s3://data/train.jsonl": "sha256:1"})
    assert fp == identity.fingerprint(_spec(**{"training.keepCheckpoints": 5}), {"s3://data/train.jsonl": "sha256:1"})


def test_another_job_or_other_data_on_the_prefix_is_refused_naming_prefix_and_job():
    mine = identity.JobIdentity("ns", "b", "uid-b", "sha256:" + "1" * 64)
    other = identity.JobIdentity("ns", "a", "uid-a", "sha256:" + "2" * 64)
    with pytest.raises(identity.ForeignPrefix) as err:
        identity.check_owner(mine, other, "checkpoint step-4", "s3://out/shared")
    assert "s3://out/shared" in str(err.value) and "job ns/a (uid uid-a)" in str(err.value)
    same_name_other_data = identity.JobIdentity("ns", "b", "uid-b", "sha256:" + "3" * 64)
    assert "different data or settings" in identity.conflict(mine, same_name_other_data)
    assert identity.conflict(mine, None) == "records no job identity"
    recreated = identity.JobIdentity("ns", "b", "uid-new", mine.fingerprint)
    assert identity.conflict(mine, recreated) is None, "the same job re-applied resumes"
    names_only = identity.JobIdentity("ns", "b", "uid-b", None)
    assert identity.conflict(names_only, same_name_other_data) is None
    assert identity.JobIdentity.from_dict(mine.to_dict()) == mine


# --- checkpoint manifests and safe loading --------------------------------------------------------


def test_manifest_with_unsafe_names_or_missing_digests_is_invalid():
    ok = {"step": 2, "files": {"state.json": "a" * 64}}
    assert verify.parse_manifest(json.dumps(ok).encode(), "m")["step"] == 2
    for files in ({"../x": "a" * 64}, {"/etc/x": "a" * 64}, {"a/./b": "a" * 64}, {"s": "nope"}, {}):
        with pytest.raises(verify.CheckpointInvalid):
            verify.parse_manifest(json.dumps({"files": files}).encode(), "m")
    with pytest.raises(verify.CheckpointInvalid, match="not valid JSON"):
        verify.parse_manifest(b'{"files": {"s": NaN}}', "m")


def test_files_must_match_the_manifest_exactly(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    manifest = {"files": {"a": file_sha256(tmp_path / "a")}}
    verify.verify_files(tmp_path, manifest, "ckpt")
    (tmp_path / "extra").write_bytes(b"x")
    with pytest.raises(verify.CheckpointInvalid, match="not in the manifest"):
        verify.verify_files(tmp_path, manifest, "ckpt")
    (tmp_path / "extra").unlink()
    (tmp_path / "a").write_bytes(b"two")
    with pytest.raises(verify.CheckpointInvalid, match="a has sha256"):
        verify.verify_files(tmp_path, manifest, "ckpt")


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    import torch
    from trust_payload import WritesAFile

    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": WritesAFile(str(marker))}, tmp_path / "optimizer.pt")
    with pytest.raises(verify.CheckpointInvalid, match="not plain tensor data"):
        verify.load_tensors(tmp_path / "optimizer.pt", "ckpt")
    assert not marker.exists()
    torch.save({"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}, tmp_path / "ok.pt")
    assert verify.load_tensors(tmp_path / "ok.pt", "ckpt")["param_groups"][0]["lr"] == 0.1


# --- the generation checks use them ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_catastrophic_user_pattern_on_a_long_output_is_bounded():
    from lora_operator.api import GenerationCheck
    from lora_trainer.evaluation.generation import Sample, pass_rate

    check = GenerationCheck.model_validate({"name": "words", "type": "mustMatch", "pattern": r"^(\w+\s?)+$"})
    replies = [" ".join(["abcde"] * 40) + "!", "fine words"]
    t0 = time.perf_counter()
    assert pass_rate(check, replies, [Sample("p", "r")] * 2) == 0.5
    assert time.perf_counter() - t0 < 2.0


def test_a_pattern_search_that_times_out_fails_that_output_and_is_counted():
    from lora_operator.api import GenerationCheck
    from lora_trainer.evaluation.generation import Sample, score

    check = GenerationCheck.model_validate({"name": "slow", "type": "mustNotMatch",
                                            "pattern": r"^(\w|\w\w)+(?<!x)$"})
    result = score(check, ["a" * 60 + "!", "ok!"], [Sample("p", "r")] * 2)
    assert result.timeouts == 1 and result.rate == 0.5, "timed out: failed, neither match nor non-match"


def test_a_json_schema_check_with_a_remote_ref_is_refused_before_generating():
    from lora_operator.api import GenerationCheck
    from lora_trainer.evaluation.generation import CheckConfigError, compile_check

    check = GenerationCheck.model_validate({"name": "remote", "type": "jsonSchema",
                                            "schema": {"$ref": "http://127.0.0.1:9/schema.json"}})
    with pytest.raises(CheckConfigError, match="remote \\$ref"):
        compile_check(check)


def test_an_unknown_check_type_is_an_error_not_a_default():
    from lora_operator.api import GenerationCheck
    from lora_trainer.evaluation.generation import CheckConfigError, compile_check

    check = GenerationCheck.model_construct(name="odd", type="mustRhyme", pattern="x", min_pass_rate=1.0)
    with pytest.raises(CheckConfigError, match="unknown check type 'mustRhyme'"):
        compile_check(check)
