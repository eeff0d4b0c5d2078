"""Per family: a short NF4 run loads the base, trains, evaluates (loss and generation checks) and
exports adapter and merged weights, on the real template of the family."""

from __future__ import annotations

import json

import families as F
import pytest
import yaml

from lora_trainer.__main__ import run_job
from lora_trainer.config import RuntimeConfig, load_job

pytestmark = pytest.mark.slow


def _job(tmp_path, base, family: str):
    from lora_trainer.io.storage import fingerprint_dir

    store = tmp_path / "store"
    shapes = ("single", "system", "multi") if F.FAMILIES[family].system else ("single", "multi")
    rows = F.conversations(12, seed=3, shapes=shapes)
    (store / "data").mkdir(parents=True)
    (store / "out").mkdir()  # the output bucket exists (preflight refuses a missing one)
    (store / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "baseModel": {"uri": f"file://{base}", "revision": fingerprint_dir(base)},
        "dataset": {"train": "s3://data/train.jsonl", "evalFraction": 0.25},
        "quantization": "nf4", "computeDtype": "float32",
        "lora": {"rank": 4, "dropout": 0.0},
        "training": {"maxSteps": 2, "batchSize": 2, "learningRate": 0.01, "seed": 1,
                     "checkpointEverySteps": 2, "evalEverySteps": 2},
        "evaluation": {"maxNewTokens": 4, "maxSamples": 2,
                       "gate": {"checks": [{"name": "answers", "type": "mustMatch", "pattern": "."}]}},
        "output": {"uri": "s3://out/job", "format": "both"},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return cfg, store


@pytest.mark.parametrize("family", list(F.FAMILIES))
def test_short_nf4_run_loads_trains_evaluates_and_exports(family_base, family, tmp_path):
    cfg, store = _job(tmp_path, family_base(family), family)
    rt = RuntimeConfig(work_dir=tmp_path / "work", storage_dir=store, progress_interval_s=0,
                       termination_log=tmp_path / "termination-log", progress_bar=False)
    assert run_job({"train", "evaluate", "export"}, load_job(cfg), rt) == 0
    out = store / "out" / "job"
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "Succeeded", progress.get("error")
    assert progress["step"] == 2 and progress["eval"]["verdict"] == "Passed"
    meta = json.loads((out / "lora-metadata.json").read_text())
    assert meta["eval"]["merged"]["maxAbsLogitDiff"] <= meta["eval"]["merged"]["tolerance"]
    assert set(meta["lora"]["targetModules"]) == set(F.FAMILIES[family].linear)  # all-linear, fused ones too
    assert meta["data"]["maxSeqLength"] == progress["maxSeqLength"] > 0  # resolved, not the spec's 0
    assert meta["data"]["droppedExamples"] == progress["droppedExamples"]
    assert meta["libraries"]["bitsandbytes"] and meta["vllm"]["maxLoraRank"] == 16
    adapter = store / progress["artifacts"]["adapter"].removeprefix("s3://")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(family_base(family))
