"""Publishing: only gated adapters, PEFT/vLLM-loadable, verified merge, a release folder and the
metadata pointer last (CPU, tiny)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_evaluation_support as world

from lora_trainer.evaluation.scoring import evaluate, load_adapted
from lora_trainer.export import (
    ExportError,
    GateRejected,
    MergeMismatch,
    merge_adapter,
    publish,
    verify_merge,
    write_adapter,
)
from lora_trainer.io import storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return world.build_world(tmp_path_factory.mktemp("support"))


@pytest.fixture(scope="module")
def passing(w):
    spec = world.make_spec(w["root"])
    return spec, evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"], checkpoint_step=40)


@pytest.fixture(scope="module")
def published(w, passing, tmp_path_factory):
    spec, report = passing
    store, key = storage.open_uri(spec.output.uri)
    uris = publish(spec, store, key, w["base"], w["adapter"], report, w["tokenizer"], eval_records=w["records"],
                   work_dir=tmp_path_factory.mktemp("work"), run_id="run1",
                   dataset_hashes={spec.dataset.train: "sha256:abc"}, started_at="2026-01-01T00:00:00Z")
    return spec, report, store, key, uris


def _out(w) -> Path:
    return w["root"] / "out"


def _release(w) -> Path:
    """The folder lora-metadata.json points at."""
    return _out(w) / "published" / json.loads((_out(w) / "lora-metadata.json").read_text())["release"]


def test_passing_job_publishes_adapter_merged_eval_and_metadata(published, w):
    _, _, store, key, uris = published
    out, release = _out(w), _release(w)
    assert release.name.startswith("run1-")
    assert uris == {"adapter": f"file://{release}/adapter", "merged": f"file://{release}/merged",
                    "eval": f"file://{release}/eval.json", "metadata": f"file://{out}/lora-metadata.json"}
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                "adapter/chat_template.jinja", "merged/config.json", "merged/model.safetensors",
                "merged/tokenizer.json", "eval.json"):
        assert (release / rel).is_file(), rel
    assert sorted(p.name for p in out.iterdir()) == ["lora-metadata.json", "published"]


def test_adapter_config_is_pure_lora_pointing_at_a_loadable_base(published, w):
    config = json.loads((_release(w) / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(w["base"])  # file:// -> its path, loadable as is
    assert not config.get("modules_to_save")
    assert config["r"] == world.RANK and config["lora_alpha"] == world.ALPHA and config["peft_type"] == "LORA"


def test_metadata_records_provenance_and_lists_every_file(published, w):
    spec, *_ = published
    out = _out(w)
    meta = json.loads((out / "lora-metadata.json").read_text())
    assert meta["baseModel"] == {"uri": spec.base_model.uri, "revision": spec.base_model.revision}
    assert meta["datasetHashes"] == {spec.dataset.train: "sha256:abc"}
    assert meta["seed"] == 7 and meta["checkpointStep"] == 40 and meta["quantization"] == "none"
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "scale": 2.0, "targetModules": ["q_proj", "v_proj"],
                            "dropout": 0.0}
    assert meta["spec"]["training"]["learningRate"] == spec.training.learning_rate  # resolved defaults
    assert meta["eval"]["gate"]["verdict"] == "Passed" and meta["eval"]["merged"]["maxAbsLogitDiff"] <= 1e-3
    assert meta["chatTemplateSha256"].startswith("sha256:") and meta["trainerVersion"]
    import peft
    import transformers

    assert meta["libraries"]["peft"] == peft.__version__
    assert meta["libraries"]["transformers"] == transformers.__version__
    assert set(meta["libraries"]) == {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    assert meta["vllm"] == {"maxLoraRank": 16, "problems": []}
    assert meta["timestamps"]["startedAt"] == "2026-01-01T00:00:00Z" and meta["timestamps"]["publishedAt"]
    release = _release(w)
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    assert set(meta["files"]) == on_disk
    assert meta["files"]["adapter/adapter_model.safetensors"] == \
        "sha256:" + storage.file_sha256(release / "adapter/adapter_model.safetensors")
    assert meta["job"] == {"namespace": "", "name": "local", "uid": ""} and "fingerprint" in meta


def test_published_adapter_loads_with_plain_peft_and_gives_the_trainer_logits(published, w, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, _, store, key, _ = published
    storage.download_prefix(store, storage.join(key, "published", _release(w).name, "adapter"), tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(w["base"]), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    trainer = load_adapted(spec, w["base"], w["adapter"], torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))
    assert tok.chat_template == w["tokenizer"].chat_template
    ids = torch.tensor([tok.apply_chat_template(w["records"][0]["messages"], tokenize=True, return_dict=True)["input_ids"]])
    with torch.inference_mode():
        diff = (plain(input_ids=ids).logits - trainer(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_merged_model_matches_base_plus_adapter(published, w):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, report, *_ = published
    print(f"\nmerge max |logit diff| (fp32): {report.merged['maxAbsLogitDiff']:.3g}")
    assert report.merged["maxAbsLogitDiff"] <= 1e-3
    assert report.merged["evalLoss"] == pytest.approx(report.adapter.loss, abs=1e-4)
    assert report.merged["gate"]["passed"]
    merged = AutoModelForCausalLM.from_pretrained(str(_release(w) / "merged"), dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(w["base"]), dtype=torch.float32),
                                    str(w["adapter"]))
    ids = torch.tensor([[3, 10, 20, 30, 40, 50]])
    with torch.inference_mode():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-3)


def test_wrong_scale_merge_is_caught_with_the_measured_difference(passing, w, tmp_path):
    from lora_trainer.evaluation.scoring import encode_records

    spec, report = passing
    write_adapter(spec, w["adapter"], w["tokenizer"], tmp_path / "adapter")
    config_path = tmp_path / "adapter/adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_alpha"] *= 2  # the shipped adapter no longer matches what was evaluated
    config_path.write_text(json.dumps(config))
    merge_adapter(w["base"], tmp_path / "adapter", tmp_path / "merged", w["tokenizer"], device=torch.device("cpu"))
    examples = encode_records(w["records"], w["tokenizer"], spec.dataset, None)
    with pytest.raises(MergeMismatch, match=r"max \|logit diff\| \S+ > tolerance 0.001\d* \(float32\)") as err:
        verify_merge(spec, w["base"], w["adapter"], tmp_path / "merged", examples, report, 0,
                     device=torch.device("cpu"))
    print(f"\nwrong-scale merge max |logit diff|: {err.value.max_abs_diff:.3g}")
    assert err.value.max_abs_diff > 100 * 1e-3


def test_adapter_whose_scale_differs_from_the_spec_is_refused(passing, w, tmp_path):
    spec, _ = passing
    other = spec.model_copy(update={"lora": spec.lora.model_copy(update={"alpha": 32.0})})
    with pytest.raises(ExportError, match="lora_alpha=16.0, the spec says rank=8 alpha=32"):
        write_adapter(other, w["adapter"], w["tokenizer"], tmp_path / "adapter")


def test_adapter_with_modules_to_save_is_refused(passing, w, tmp_path):
    spec, _ = passing
    shutil.copytree(w["adapter"], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/adapter_config.json").read_text())
    (tmp_path / "ckpt/adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ExportError, match="modules_to_save"):
        write_adapter(spec, tmp_path / "ckpt", w["tokenizer"], tmp_path / "adapter")


def test_rank_above_the_servers_max_lora_rank_is_published_with_a_warning(passing, w, tmp_path):
    spec, _ = passing
    big = spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": 32, "alpha": 16.0})})
    shutil.copytree(w["adapter"], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/adapter_config.json").read_text())
    (tmp_path / "ckpt/adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    _, warnings = write_adapter(big, tmp_path / "ckpt", w["tokenizer"], tmp_path / "adapter")
    assert warnings == ["rank 32 > the server's --max-lora-rank 16 (output.vllmMaxLoraRank): vLLM refuses "
                        "to load this adapter"]


def test_vllm_check_reports_every_incompatibility():
    from lora_trainer.export import vllm_problems

    config = {"r": 600, "use_dora": True, "bias": "all", "modules_to_save": ["score"],
              "target_modules": ["q_proj", "embed_tokens", "lm_head"]}
    problems = vllm_problems(config, 64)
    assert len(problems) == 6, problems
    assert any("embed_tokens, lm_head" in p for p in problems)
    assert vllm_problems({"r": 16, "target_modules": "all-linear"}, 16) == []


@pytest.mark.parametrize("uri,name", [("hf://meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
                                      ("file:///models/qwen", "/models/qwen"),
                                      ("s3://models/base/qwen2.5-7b-instruct/", "qwen2.5-7b-instruct"),
                                      ("pvc://models/llama", "llama")])
def test_base_model_name_is_loadable_not_a_storage_uri(uri, name):
    from lora_trainer.export import loadable_base_name

    assert loadable_base_name(uri) == name


def test_rejected_job_publishes_nothing(w, tmp_path):
    from lora_trainer.evaluation.scoring import write_eval_json

    spec = world.make_spec(tmp_path, gate={"maxEvalLoss": 1e-4})
    report = evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"])
    store, key = storage.open_uri(spec.output.uri)
    write_eval_json(store, key, report)  # the verdict and its reasons are still reported
    with pytest.raises(GateRejected, match="evalLoss: .* vs <= 0.0001"):
        publish(spec, store, key, w["base"], w["adapter"], report, w["tokenizer"], eval_records=w["records"],
                work_dir=tmp_path / "work")
    assert store.list(key) == [storage.join(key, "eval.json")]


class FlakyStore:
    """An outage: every write from the nth put_file on fails for good (as RetryingStore does when
    its budget is spent); with fail_on=0 only the metadata pointer's write fails."""

    def __init__(self, inner, fail_on: int):
        self.inner, self.fail_on, self.writes = inner, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _write(self, op: str, *args):
        self.writes += 1
        if (self.fail_on and self.writes >= self.fail_on) or (not self.fail_on and args[0].endswith(
                "lora-metadata.json")):
            raise storage.StorageError(f"{op} {args[0]} failed after 5 attempts: ConnectionError")
        return getattr(self.inner, op)(*args)

    def put_file(self, key, src):
        return self._write("put_file", key, src)

    def copy(self, src_key, dst_key):
        return self._write("copy", src_key, dst_key)

    def put_bytes(self, key, data):
        return self._write("put_bytes", key, data)


@pytest.mark.parametrize("fail_on", [2, 0], ids=["should keep the previous set when the release upload fails",
                                                 "should keep the previous set when the pointer write fails"])
def test_failed_upload_leaves_the_previous_complete_set_published(passing, w, tmp_path, fail_on):
    spec = world.make_spec(tmp_path, fmt="adapter")
    _, report = passing
    store, key = storage.open_uri(spec.output.uri)
    args = (spec, store, key, w["base"], w["adapter"], report, w["tokenizer"])
    publish(*args, eval_records=w["records"], work_dir=tmp_path / "work", run_id="old")
    meta_key = storage.join(key, "lora-metadata.json")
    old_meta = store.get_bytes(meta_key)
    flaky = FlakyStore(store, fail_on)
    with pytest.raises(storage.StorageError):
        publish(spec, flaky, *args[2:], eval_records=w["records"], work_dir=tmp_path / "work", run_id="new")
    assert store.get_bytes(meta_key) == old_meta
    for rel in json.loads(old_meta)["files"]:
        assert store.exists(storage.join(key, "published", json.loads(old_meta)["release"], rel)), rel
    publish(*args, eval_records=w["records"], work_dir=tmp_path / "work", run_id="again")
    releases = {k.split("/published/")[1].split("/")[0] for k in store.list(storage.join(key, "published"))}
    assert len(releases) == 2, "the half-uploaded release is collected; the previous one is kept for readers"


def test_publishing_over_another_jobs_set_is_refused(passing, w, tmp_path):
    from lora_trainer.io.identity import ForeignPrefix, JobIdentity

    spec = world.make_spec(tmp_path, fmt="adapter")
    _, report = passing
    store, key = storage.open_uri(spec.output.uri)
    args = (spec, store, key, w["base"], w["adapter"], report, w["tokenizer"])
    publish(*args, eval_records=w["records"], work_dir=tmp_path / "work", identity=JobIdentity("ns", "a", "1", "sha256:x"))
    with pytest.raises(ForeignPrefix, match="job ns/a"):
        publish(*args, eval_records=w["records"], work_dir=tmp_path / "work",
                identity=JobIdentity("ns", "b", "2", "sha256:y"))


def test_qlora_adapter_is_merged_into_and_verified_against_the_16bit_base(w, tmp_path):
    """Evaluated on the NF4 base (as trained); merged/ is the 16-bit base + adapter, and its own
    held-out loss (not the NF4 one) is what the gate is re-checked on."""
    spec = world.make_spec(tmp_path, quantization="nf4")
    report = evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"])
    store, key = storage.open_uri(spec.output.uri)
    publish(spec, store, key, w["base"], w["adapter"], report, w["tokenizer"], eval_records=w["records"],
            work_dir=tmp_path / "work")
    merged = report.merged
    print(f"\nNF4 adapter loss {report.adapter.loss:.4f}, merged 16-bit loss {merged['evalLoss']:.4f}, "
          f"merge diff {merged['maxAbsLogitDiff']:.3g}")
    assert merged["maxAbsLogitDiff"] <= 1e-3
    assert merged["evalLoss"] != report.adapter.loss  # NF4 error is real, hence the 16-bit reload
    assert merged["evalLoss"] == pytest.approx(report.adapter.loss, rel=0.2)
    # The gate compares the merged model with the 16-bit base it was merged into, not the NF4 base.
    assert merged["baseEvalLoss"] != report.base.loss
    assert merged["baseEvalLoss"] == pytest.approx(report.base.loss, rel=0.2)
    [loss_row] = [r for r in merged["gate"]["results"] if r["name"] == "evalLoss"]
    assert loss_row["base"] == merged["baseEvalLoss"] and loss_row["adapter"] == merged["evalLoss"]
    meta = json.loads(store.get_bytes(storage.join(key, "lora-metadata.json")))
    assert meta["quantization"] == "nf4" and meta["eval"]["merged"]["gate"]["passed"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_merge_passes_the_16bit_tolerance(passing, w, tmp_path, dtype):
    from lora_trainer.evaluation.scoring import encode_records

    spec, report = passing
    merge_adapter(w["base"], w["adapter"], tmp_path / "merged", w["tokenizer"], dtype=dtype,
                  device=torch.device("cpu"))
    examples = encode_records(w["records"], w["tokenizer"], spec.dataset, None)
    result = verify_merge(spec, w["base"], w["adapter"], tmp_path / "merged", examples, report, 0, dtype=dtype,
                          device=torch.device("cpu"))
    print(f"\n{dtype} merge max |logit diff| {result['maxAbsLogitDiff']:.3g}, tolerance {result['tolerance']:.3g}")
    assert 0 < result["maxAbsLogitDiff"] <= result["tolerance"]
