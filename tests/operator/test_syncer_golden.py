"""The vLLM LoRA syncer ConfigMap (lora-syncer format), compared to a checked-in golden file.

Regenerate after an intended change: UPDATE_GOLDEN=1 pytest tests/operator/test_syncer_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lora_operator.api.channel import PromotionRecord, VLLMSyncerSpec
from lora_operator.api.spec import BaseModelRef
from lora_operator.builders.syncer import SYNCER_KEY, ChannelServing, build_syncer_configmap, is_ours, syncer_config

GOLDEN = Path(__file__).parent / "golden" / "lora-syncer-configmap.yaml"
BASE = BaseModelRef(uri="hf://Qwen/Qwen3-8B", revision="b968826d9c46dd6066d109eabc6255188de91218")
POOL = VLLMSyncerSpec(config_map_name="vllm-qwen3-adapters", base_model_name="Qwen/Qwen3-8B",
                      source_prefix={"storage": "s3://adapters/", "serving": "/mnt/adapters/"})


def rec(job: str, channel: str) -> PromotionRecord:
    return PromotionRecord(run_id=f"run-{job}", job_name=job, base_model=BASE,
                           adapter=f"s3://adapters/team-a/{job}/adapter", adapter_id=f"{channel}-{job}")


def servings():
    return [
        ChannelServing("support-eu", POOL, rec("v3", "support-eu"), (rec("v2", "support-eu"),)),
        ChannelServing("billing", POOL.model_copy(update={"port": 9000}), rec("b1", "billing")),
    ]


def test_should_build_the_checked_in_syncer_configmap():
    manifest = build_syncer_configmap("team-a", servings())
    manifest["data"] = {k: yaml.safe_load(v) for k, v in manifest["data"].items()}
    rendered = yaml.safe_dump(manifest, sort_keys=True)
    if os.environ.get("UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "lora-syncer ConfigMap differs; UPDATE_GOLDEN=1 if intended"


def test_should_load_live_adapters_and_unload_the_ones_they_replaced():
    config = syncer_config(servings())["vLLMLoRAConfig"]
    assert [m["id"] for m in config["ensureExist"]["models"]] == ["billing-b1", "support-eu-v3"]
    assert [m["id"] for m in config["ensureNotExist"]["models"]] == ["support-eu-v2"]
    assert config["ensureExist"]["models"][1]["source"] == "/mnt/adapters/team-a/v3/adapter"


def test_should_never_unload_an_adapter_that_is_live_again_after_a_rollback():
    rolled_back = ChannelServing("support-eu", POOL, rec("v2", "support-eu"), (rec("v3", "support-eu"),
                                                                               rec("v2", "support-eu")))
    config = syncer_config([rolled_back])["vLLMLoRAConfig"]
    assert [m["id"] for m in config["ensureExist"]["models"]] == ["support-eu-v2"]
    assert [m["id"] for m in config["ensureNotExist"]["models"]] == ["support-eu-v3"]


def test_should_take_pool_settings_from_one_channel_whatever_the_order():
    assert syncer_config(servings()) == syncer_config(list(reversed(servings())))
    assert syncer_config(servings())["vLLMLoRAConfig"]["port"] == 9000  # "billing" sorts first


def test_should_only_claim_configmaps_it_made():
    made = build_syncer_configmap("team-a", servings())
    assert is_ours(made) and not is_ours({"metadata": {"labels": {"app": "vllm"}}})
    assert set(made["data"]) == {SYNCER_KEY}
