"""Human-facing progress: a tqdm bar on a TTY, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections import deque
from typing import Optional

log = logging.getLogger("lora_trainer")


class StepReporter:
    """Throughput and ETA over a sliding window of steps, and the per-step log line."""

    def __init__(self, total_steps: int, start_step: int, runtime, enabled: bool = True,
                 window: int = 20):
        self.total = total_steps
        self.enabled = enabled
        self.every = max(1, runtime.log_every_steps)
        self._times: deque = deque(maxlen=window)
        self._tokens: deque = deque(maxlen=window)
        use_bar = runtime.progress_bar if runtime.progress_bar is not None else sys.stderr.isatty()
        self.bar = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def tokens_per_second(self, tokens: float, elapsed: float) -> float:
        self._times.append(elapsed)
        self._tokens.append(tokens)
        return sum(self._tokens) / max(sum(self._times), 1e-9)

    def eta_seconds(self, step: int) -> Optional[int]:
        if not self._times:
            return None
        return int(round((self.total - step) * sum(self._times) / len(self._times)))

    def log(self, f: dict) -> None:
        if not self.enabled:
            return
        ev = f" eval_loss {f['evalLoss']:.4f}" if f.get("evalLoss") is not None else ""
        mfu = f" mfu {f['mfu']:.1%}" if f.get("mfu") is not None else ""
        mem = f"{f['peakMemoryBytes'] / 2**20:.0f}MiB"
        if self.bar is not None:
            self.bar.update(f["step"] - self.bar.n)
            self.bar.set_postfix_str(f"loss {f['loss']:.4f}{ev} {f['tokensPerSecond']:.0f} tok/s "
                                     f"mem {mem}{mfu}", refresh=False)
        elif f["step"] % self.every == 0 or f["step"] == self.total or ev:
            log.info("step %d/%d loss %.4f%s lr %.3g %.0f tok/s mem %s%s eta %ss", f["step"],
                     self.total, f["loss"], ev, f["learningRate"], f["tokensPerSecond"], mem, mfu,
                     f.get("etaSeconds"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
