"""Table tests of the pure promotion logic (status/channel.py) and the pointer builder."""

from __future__ import annotations

from typing import Any

import pytest

from lora_operator.api.channel import ChannelPointer, PromotionRecord, parse_channel_spec
from lora_operator.api.spec import BaseModelRef
from lora_operator.builders.pointer import build_record, eval_summary, next_pointer, pointer_uri
from lora_operator.status import channel as ch
from lora_operator.status.channel import ChannelObserved, Refusal

REV = "sha256:" + "a" * 64
OTHER_REV = "sha256:" + "b" * 64
OUT = "s3://team-a/runs/v2"
NOW = "2026-01-01T00:00:00Z"


def channel_spec(**kw: Any):
    raw = {"jobName": "v2", "baseModel": {"uri": "s3://models/base", "revision": REV}, **kw}
    return parse_channel_spec(raw)


def job(phase="Succeeded", verdict="Passed", revision=REV, uid="uid-2", name="v2") -> dict[str, Any]:
    status = {"phase": phase, "evaluation": {"verdict": verdict, "reasons": ["evalLoss 1.9 > 1.5"]}}
    return {"metadata": {"name": name, "uid": uid},
            "spec": {"baseModel": {"uri": "s3://models/base", "revision": revision}, "output": {"uri": OUT}},
            "status": status}


def metadata(**kw: Any) -> dict[str, Any]:
    raw = {"schemaVersion": 1, "runId": "run-2", "baseModel": {"uri": "s3://models/base", "revision": REV},
           "artifacts": {"adapter": f"{OUT}/adapter", "merged": None, "metadata": f"{OUT}/lora-metadata.json"},
           "eval": {"base": {"loss": 2.0}, "adapter": {"loss": 1.2}, "gate": {"verdict": "Passed"}}}
    raw.update(kw)
    return raw


def record(job_name="v1", run="run-1") -> PromotionRecord:
    return PromotionRecord(run_id=run, job_name=job_name, job_uid=f"uid-{job_name}",
                           base_model=BaseModelRef(uri="s3://models/base", revision=REV), adapter=f"s3://x/{job_name}")


@pytest.mark.parametrize("case, body, reason", [
    ("should wait while the job is missing", None, ch.JOB_NOT_FOUND),
    ("should wait while the job trains", job(phase="Training", verdict=None), ch.WAITING_FOR_JOB),
    ("should refuse a Rejected job", job(phase="Rejected", verdict="Failed"), ch.GATE_NOT_PASSED),
    ("should refuse a job whose gate failed even before its phase says so", job(phase="Exporting", verdict="Failed"),
     ch.GATE_NOT_PASSED),
    ("should refuse a Failed job", job(phase="Failed", verdict=None), ch.JOB_FAILED),
    ("should refuse a job on another base revision", job(revision=OTHER_REV), ch.BASE_REVISION_MISMATCH),
    ("should refuse another revision while it is still training", job(phase="Training", verdict=None,
                                                                      revision=OTHER_REV), ch.BASE_REVISION_MISMATCH),
    ("should refuse Succeeded without a Passed verdict", job(verdict=None), ch.GATE_NOT_PASSED),
    ("should accept Succeeded with a Passed gate on the served revision", job(), None),
])
def test_check_job(case, body, reason):
    refusal = ch.check_job(channel_spec(), body)
    assert (refusal.reason if refusal else None) == reason, case


@pytest.mark.parametrize("case, raw, reason", [
    ("should wait for lora-metadata.json (written last)", None, ch.ARTIFACTS_INCOMPLETE),
    ("should refuse metadata that is not the trainer's", {"hello": 1}, ch.ARTIFACTS_INVALID),
    ("should refuse metadata naming another base revision",
     metadata(baseModel={"uri": "s3://models/base", "revision": OTHER_REV}), ch.BASE_REVISION_MISMATCH),
    ("should refuse metadata without a Passed gate", metadata(eval={"gate": {"verdict": "Failed"}}),
     ch.GATE_NOT_PASSED),
    ("should refuse artifacts outside the job's output prefix",
     metadata(artifacts={"adapter": "s3://team-b/secret/adapter"}), ch.ARTIFACTS_INVALID),
    ("should refuse a sibling prefix that only shares the string start",
     metadata(artifacts={"adapter": f"{OUT}-evil/adapter"}), ch.ARTIFACTS_INVALID),
    ("should refuse metadata without any artifact", metadata(artifacts={}), ch.NO_ADAPTER),
    ("should accept complete metadata", metadata(), None),
])
def test_check_metadata(case, raw, reason):
    meta, refusal = ch.check_metadata(channel_spec(), OUT, raw)
    assert (refusal.reason if refusal else None) == reason, case
    assert (meta is None) == (reason is not None)


def test_should_refuse_merged_only_artifacts_when_vllm_needs_the_adapter():
    spec = channel_spec(vllm={"configMapName": "pool"})
    raw = metadata(artifacts={"merged": f"{OUT}/merged"})
    assert ch.check_metadata(spec, OUT, raw)[1].reason == ch.NO_ADAPTER
    assert ch.check_metadata(channel_spec(), OUT, raw)[1] is None


def test_should_see_the_job_live_only_when_the_pointer_names_it_and_the_run_is_the_same():
    spec = channel_spec(jobName="v1")
    pointer = next_pointer("ns/prod", None, record("v1"), 5)
    assert ch.is_live(spec, pointer, job(name="v1", uid="uid-v1"))
    assert ch.is_live(spec, pointer, None), "a deleted job keeps serving its artifacts"
    assert not ch.is_live(spec, pointer, job(name="v1", uid="recreated")), "a new run under the same name"
    assert not ch.is_live(channel_spec(jobName="v2"), pointer, job())
    assert not ch.is_live(spec, None, job(name="v1", uid="uid-v1"))


def test_should_roll_back_to_a_deleted_job_only_from_history_on_the_served_revision():
    pointer = next_pointer("ns/prod", next_pointer("ns/prod", None, record("v1"), 5), record("v2", "run-2"), 5)
    assert ch.from_history(channel_spec(jobName="v1"), pointer).run_id == "run-1"
    assert ch.from_history(channel_spec(jobName="v0"), pointer) is None, "never promoted here"
    other = channel_spec(jobName="v1", baseModel={"uri": "s3://models/base", "revision": OTHER_REV})
    assert ch.from_history(other, pointer) is None, "the fleet moved to another base"
    assert ch.from_history(channel_spec(jobName="v1"), None) is None


def test_should_keep_previous_pointers_newest_first_up_to_the_history_limit():
    pointer = None
    for n in range(1, 5):
        pointer = next_pointer("ns/prod", pointer, record(f"v{n}", f"run-{n}"), history_limit=2)
    assert pointer.live.run_id == "run-4"
    assert [r.run_id for r in pointer.history] == ["run-3", "run-2"]
    assert ChannelPointer.model_validate(pointer.to_wire()) == pointer, "the stored form reads back"


def test_should_build_the_record_from_metadata_and_name_the_vllm_adapter_by_job():
    spec = channel_spec(vllm={"configMapName": "pool", "adapterName": "support"})
    meta, _ = ch.check_metadata(spec, OUT, metadata())
    rec = build_record(spec, "prod", job(), meta, f"{OUT}/lora-metadata.json", NOW)
    assert (rec.run_id, rec.job_name, rec.job_uid, rec.adapter, rec.adapter_id) == (
        "run-2", "v2", "uid-2", f"{OUT}/adapter", "support-v2")
    assert rec.eval_summary == "held-out loss base 2.0000 -> adapter 1.2000"
    with_champion = {"base": {"loss": 2.0}, "adapter": {"loss": 1.2},
                     "champion": {"channel": "prod", "runId": "run-1", "loss": {"loss": 1.3, "tokens": 9}}}
    assert eval_summary(with_champion) == "held-out loss base 2.0000 -> adapter 1.2000 (champion 1.3000)"
    assert pointer_uri("s3://platform/channels/", "team-a", "prod") == "s3://platform/channels/team-a/prod/current.json"


def test_should_not_use_a_pointer_it_cannot_parse():
    assert ch.parse_pointer(None) == (None, None)
    pointer, bad = ch.parse_pointer({"schemaVersion": 1, "channel": "x"})
    assert pointer is None and bad and "not a valid pointer" in bad


def _status(pointer=None, refusal=None, syncer=None, syncer_name=None, previous=None):
    return ch.derive_channel_status(ChannelObserved(3, NOW, previous or {}, pointer=pointer, pointer_uri="s3://p",
                                                    refusal=refusal, syncer=syncer, syncer_name=syncer_name))


def _conds(status):
    return {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}


def test_should_be_live_and_ready_when_the_wanted_job_is_promoted_and_synced():
    pointer = next_pointer("ns/prod", next_pointer("ns/prod", None, record("v1"), 5), record("v2", "run-2"), 5)
    status = _status(pointer, syncer_name="pool")
    assert status["phase"] == "Live"
    assert status["live"]["jobName"] == "v2" and status["previous"]["jobName"] == "v1"
    assert _conds(status) == {"Promoted": ("True", "Live"), "SyncerUpdated": ("True", "Synced"),
                              "Ready": ("True", "Live"), "Reconciling": ("False", "Live"), "Stalled": ("False", "Live")}


@pytest.mark.parametrize("reason, phase", [(ch.JOB_NOT_FOUND, "Pending"), (ch.GATE_NOT_PASSED, "Refused"),
                                           (ch.BASE_REVISION_MISMATCH, "Refused"), (ch.STORAGE_ERROR, "Failed")])
def test_should_keep_serving_the_old_run_while_saying_why_the_wanted_one_is_not_live(reason, phase):
    pointer = next_pointer("ns/prod", None, record("v1"), 5)
    status = _status(pointer, refusal=Refusal(reason, "why"))
    assert status["phase"] == phase and status["live"]["jobName"] == "v1"
    assert _conds(status)["Promoted"] == ("False", reason) and _conds(status)["Ready"] == ("False", reason)
    kstatus = (_conds(status)["Reconciling"][0], _conds(status)["Stalled"][0])
    assert kstatus == (("True", "False") if phase == "Pending" else ("False", "True")), "Flux and Argo CD read these"


def test_should_fail_when_the_syncer_configmap_belongs_to_someone_else():
    status = _status(next_pointer("ns/prod", None, record("v1"), 5), syncer=Refusal(ch.SYNCER_CONFLICT, "theirs"),
                     syncer_name="pool")
    assert status["phase"] == "Failed" and _conds(status)["Ready"] == ("False", ch.SYNCER_CONFLICT)


def test_should_warn_once_per_new_refusal_and_never_for_waiting():
    first = _status(refusal=Refusal(ch.GATE_NOT_PASSED, "gate failed"))
    assert [(e.type, e.reason) for e in ch.channel_events([], first["conditions"])] == [("Warning", "GateNotPassed")]
    again = _status(refusal=Refusal(ch.GATE_NOT_PASSED, "gate failed"), previous=first)
    assert ch.channel_events(first["conditions"], again["conditions"]) == []
    waiting = _status(refusal=Refusal(ch.WAITING_FOR_JOB, "training"))
    assert ch.channel_events([], waiting["conditions"]) == []


def test_should_say_what_a_promotion_replaced():
    event = ch.promotion_event(record("v2", "run-2"), record("v1", "run-1"))
    assert event.reason == "Promoted" and "replaced run run-1 of v1" in event.message
    assert "first promotion" in ch.promotion_event(record("v1"), None).message


@pytest.mark.parametrize("case, body, expect", [
    ("should say when the channel does not exist", None, "not found"),
    ("should say when nothing is live yet", {"status": {}}, "serves no adapter yet"),
    ("should not compare across base revisions",
     {"status": {"live": {"adapter": "s3://x/a", "baseModel": {"revision": OTHER_REV}}}}, "serves base revision"),
])
def test_should_resolve_no_champion_and_say_why(case, body, expect):
    got = ch.resolve_champion("production", body, REV)
    assert set(got) == {"channel", "missing"} and expect in got["missing"], case


def test_should_resolve_the_live_adapter_of_the_channel_as_champion():
    live = {"runId": "run-1", "jobName": "v1", "adapter": "s3://x/v1/adapter", "metadata": "s3://x/v1/lora-metadata.json",
            "baseModel": {"uri": "s3://models/base", "revision": REV}}
    assert ch.resolve_champion("production", {"status": {"live": live}}, REV) == {
        "channel": "production", "runId": "run-1", "jobName": "v1", "adapter": "s3://x/v1/adapter",
        "metadata": "s3://x/v1/lora-metadata.json"}


def test_should_hand_the_champion_to_the_trainer_outside_the_user_spec(owner, make_spec):
    import yaml

    from lora_operator.builders import build_configmap

    spec = make_spec(**{"evaluation.gate.champion": {"channel": "production"}})
    champion = {"channel": "production", "runId": "run-1", "adapter": "s3://x/v1/adapter"}
    manifest = yaml.safe_load(build_configmap(owner, spec, image="img", endpoint=None, champion=champion)["data"]["job.yaml"])
    assert manifest["champion"] == champion
    assert manifest["spec"]["evaluation"]["gate"]["champion"] == {
        "channel": "production", "maxLossIncrease": 0.0, "maxRegressionLossIncrease": 0.0, "maxPassRateDrop": 0.0}
    plain = yaml.safe_load(build_configmap(owner, make_spec(), image="img", endpoint=None)["data"]["job.yaml"])
    assert "champion" not in plain
