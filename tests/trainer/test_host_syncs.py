"""A training step reads the loss back from the device once, not once per micro-batch (each read is
a host sync that stalls the GPU queue); the step's numbers do not change."""

from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.config import RuntimeConfig, load_job
from lora_trainer.recipe import LoRARecipe


@pytest.mark.slow
def test_a_step_of_four_micro_batches_reads_the_device_once(make_job, tmp_path, monkeypatch):
    cfg, store = make_job(n_train=24, **{"training.gradientAccumulationSteps": 4, "training.batchSize": 1})
    rt = RuntimeConfig(work_dir=tmp_path / "work", storage_dir=store, progress_interval_s=0,
                       termination_log=tmp_path / "termination-log", progress_bar=False)
    recipe = LoRARecipe(load_job(cfg), rt)
    recipe.setup()
    try:
        reads = {"float": 0, "item": 0, "tolist": 0}
        counting = [True]
        step = recipe.optimizer.step

        def optimizer_step(*a, **kw):  # AdamW reads its CPU step counters: not the loop's doing
            counting[0] = False
            try:
                return step(*a, **kw)
            finally:
                counting[0] = True

        monkeypatch.setattr(recipe.optimizer, "step", optimizer_step)
        for name, attr in (("float", "__float__"), ("item", "item"), ("tolist", "tolist")):
            real = getattr(torch.Tensor, attr)

            def counted(self, *a, _real=real, _name=name, **kw):
                if counting[0] and self.is_floating_point():  # losses; index lists (the schedule) are host data
                    reads[_name] += 1
                return _real(self, *a, **kw)

            monkeypatch.setattr(torch.Tensor, attr, counted)
        m = recipe.train_step()
        monkeypatch.undo()
    finally:
        recipe.cleanup()
    assert reads == {"float": 0, "item": 0, "tolist": 1}
    assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens"] > 0
