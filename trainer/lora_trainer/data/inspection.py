"""`lora-trainer inspect CONFIG`: how each example will be trained, before any GPU time is spent.

`run.inspect_job` reads the training data exactly as training does (`prepare.prepare_data`: same
download, validation, split, template, masking and maxSeqLength fitting); this module prints, per
training example in file order (held-out records are not shown),
the rendered text with its trained tokens marked (green on a terminal, between ⟦ and ⟧ otherwise),
or with --json one object per line:

    {"line": 12, "turn": null, "tokens": 85, "trainedTokens": 31,
     "trained": ["Sure, badge 7 reset.<|im_end|>\\n"], "dropped": null}

A record the template refuses, or an example dropped by maxSeqLength, appears with its line and a
`dropped` reason. Last comes {"summary": {"examples", "dropped", "truncated", "maxSeqLength", "p95"}}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Optional, TextIO

from .records import IGNORE

GREEN, RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"


def runs(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive (trained?, token ids) runs of an example."""
    out: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(ids, labels):
        trained = lab != IGNORE
        if out and out[-1][0] == trained:
            out[-1][1].append(tok)
        else:
            out.append((trained, [tok]))
    return out


def example_record(tokenizer, ex, dropped: Optional[str] = None) -> dict:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return {"line": ex.line, "turn": ex.turn, "tokens": len(ex.ids),
            "trainedTokens": sum(1 for lab in ex.labels if lab != IGNORE),
            "trained": [decode(r) for t, r in runs(ex.ids, ex.labels) if t], "dropped": dropped}


def drop_record(drop) -> dict:
    return {"line": drop.line, "turn": drop.turn, "tokens": drop.tokens, "trainedTokens": 0, "trained": [],
            "dropped": drop.reason}


def marked_text(tokenizer, ex, colour: bool) -> str:
    """The example's text with trained runs marked."""
    parts = []
    for trained, ids in runs(ex.ids, ex.labels):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parts.append((GREEN + text + RESET if colour else OPEN + text + CLOSE) if trained else text)
    return "".join(parts)


def write_report(tokenizer, items: Iterable[tuple], summary: dict, *, as_json: bool, limit: Optional[int],
                 out: TextIO = sys.stdout, colour: Optional[bool] = None) -> None:
    """`items`: (example or None, drop or None) in file order; the first `limit` are printed."""
    colour = out.isatty() if colour is None else colour
    for n, (ex, drop) in enumerate(items):
        if limit is not None and n >= limit:
            break
        record = drop_record(drop) if ex is None else example_record(tokenizer, ex, drop.reason if drop else None)
        if as_json:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            continue
        turn = f" turn {record['turn']}" if record["turn"] is not None else ""
        head = f"--- line {record['line']}{turn}: {record['tokens']} tokens, {record['trainedTokens']} trained"
        out.write(head + (f", DROPPED: {record['dropped']}" if record["dropped"] else "") + "\n")
        if ex is not None:
            out.write(marked_text(tokenizer, ex, colour) + "\n")
    if as_json:
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        out.write("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + "\n")

