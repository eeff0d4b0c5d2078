"""The real `lora-trainer`, with a pause before each optimizer step (LORA_TEST_STEP_PAUSE_S, default 0.5).

For cluster tests that must act while a real trainer is mid-training (preemption): the tiny golden
job trains its 22 steps in about two seconds, faster than a preemption can land. The pause changes
no number the trainer computes.
"""

from __future__ import annotations

import os
import sys
import time

from lora_trainer.__main__ import main
from lora_trainer.recipe import LoRARecipe

PAUSE_S = float(os.environ.get("LORA_TEST_STEP_PAUSE_S", "0.5"))
_step = LoRARecipe.train_step


def _paused_step(self):
    time.sleep(PAUSE_S)
    return _step(self)


LoRARecipe.train_step = _paused_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
