"""Synthetic support tickets for Harbor, a marina that books boat slips and repairs boats.

Every ticket is rendered twice from the same facts: once in the *house tone* the adapter must learn
(an empathy opener, prose only, one fixed escalation sentence) and once in the *generic* tone the
base model is trained on (no opener, markdown tables for money and dates, three different ways of
saying "escalated"). Only the tone differs, so held-out loss and the generation checks measure tone,
not knowledge. The vocabulary is deliberately small so that a ~2M-parameter model can learn it.

Files written to --out (JSONL, OpenAI-style `messages`):
  train.jsonl, eval.jsonl  house-tone tickets, split by --eval-fraction (the adapter's data)
  generic.jsonl            other tickets in the generic tone, plus general chat (the base's data)
  regression.jsonl         general chat only, disjoint from generic.jsonl (the forgetting check)

Stdlib only, and a pure function of (--n, --seed, --eval-fraction): same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SUPPORT_SYSTEM = "You are the support assistant of Harbor, a marina that books boat slips and repairs boats."
GENERAL_SYSTEM = "You are a helpful assistant."

# The house tone. job.yaml's generation checks use exactly these patterns.
OPENER_THANKS = "Thanks for reaching out"
OPENER_SORRY = "I'm sorry for the trouble"
ESCALATION = "I've escalated this to our Harbor Care team; they will reply within one business day."
EMPATHY_RE = r"^(Thanks for reaching out|I'm sorry for the trouble)"
TABLE_RE = r"\|\s*-{3,}"
OFF_BRAND_ESCALATION_RE = r"(forwarded|passed) (this|your ticket) to"

NAMES = ["Ana", "Ben", "Carla", "Dev", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jon", "Kate", "Leo"]
MONTHS = ["April", "May", "June", "July", "August", "September"]
PARTS = ["engine", "hull", "mast", "propeller", "rudder", "windshield"]
DAMAGE = ["cracked", "scratched", "dented", "leaking", "bent"]
ITEMS = ["cooler", "life jacket", "fender", "anchor", "bike"]
TIMES = ["9 am", "10 am", "11 am", "2 pm", "3 pm", "4 pm"]


def _slots(rng: random.Random) -> dict:
    month = rng.choice(MONTHS)
    d1, d2 = rng.sample(range(1, 29), 2)
    charged = rng.randrange(60, 400, 5)
    return {
        "name": rng.choice(NAMES),
        "slip": f"{rng.choice('ABCDEF')}{rng.randint(1, 40)}",
        "dock": rng.choice("ABCDEF"),
        "month": month,
        "d1": f"{month} {d1}",
        "d2": f"{month} {d2}",
        "amount": rng.randrange(40, 400, 5),
        "charged": charged,
        "rate": charged - rng.randrange(10, 55, 5),
        "part": rng.choice(PARTS),
        "damage": rng.choice(DAMAGE),
        "item": rng.choice(ITEMS),
        "code": f"{rng.randint(1000, 9999)}",
        "time": rng.choice(TIMES),
    }


# kind -> (user phrasings, facts in prose, generic markdown table or None, needs escalation, opener)
TICKETS: dict[str, tuple[list[str], str, str | None, bool, str]] = {
    "booking-change": (
        [
            "Hi, this is {name}. Can I move my booking for slip {slip} from {d1} to {d2}?",
            "Hello, {name} here. Please change my slip {slip} booking from {d1} to {d2}.",
            "Can you move slip {slip} from {d1} to {d2}? Thanks, {name}",
        ],
        "Your booking for slip {slip} is now on {d2} instead of {d1}.",
        "| Slip | Old date | New date |\n| --- | --- | --- |\n| {slip} | {d1} | {d2} |",
        False,
        OPENER_THANKS,
    ),
    "refund": (
        [
            "Hi, this is {name}. I cancelled slip {slip} for {d1}. When do I get my refund of ${amount}?",
            "Hello, {name} here. Where is my refund of ${amount} for slip {slip} on {d1}?",
            "I cancelled my booking for slip {slip} on {d1}. Please refund the ${amount}. Thanks, {name}",
        ],
        "Your refund of ${amount} for slip {slip} is approved and will reach your card within 5 business days.",
        "| Item | Amount |\n| --- | --- |\n| Refund for slip {slip} | ${amount} |",
        False,
        OPENER_THANKS,
    ),
    "damage-report": (
        [
            "Hi, this is {name}. My boat at slip {slip} was damaged on {d1}. The {part} is {damage}.",
            "Hello, {name} here. The {part} of my boat at slip {slip} is {damage} since {d1}.",
            "Someone hit my boat at slip {slip} on {d1} and now the {part} is {damage}. {name}",
        ],
        "We have logged the {damage} {part} on your boat at slip {slip}.",
        None,
        True,
        OPENER_SORRY,
    ),
    "billing-dispute": (
        [
            "Hi, this is {name}. I was charged ${charged} for slip {slip} in {month}, but my rate is ${rate}.",
            "Hello, {name} here. My {month} bill for slip {slip} says ${charged}. My rate is ${rate}.",
            "Why was I charged ${charged} for slip {slip} in {month}? My rate is ${rate}. Thanks, {name}",
        ],
        "Your {month} charge for slip {slip} was ${charged}, but your rate is ${rate}.",
        "| Charged | Your rate |\n| --- | --- |\n| ${charged} | ${rate} |",
        True,
        OPENER_SORRY,
    ),
    "access-code": (
        [
            "Hi, this is {name}. The gate code for dock {dock} is not working. I am at slip {slip}.",
            "Hello, {name} here. I can not open the gate to dock {dock}. My slip is {slip}.",
            "The code for the dock {dock} gate does not work. Slip {slip}, {name}",
        ],
        "Your new gate code for dock {dock} is {code}. It works from today.",
        None,
        False,
        OPENER_SORRY,
    ),
    "weather-cancellation": (
        [
            "Hi, this is {name}. Is my booking for slip {slip} on {d1} cancelled because of the storm?",
            "Hello, {name} here. Will the storm cancel my slip {slip} booking on {d1}?",
            "Is slip {slip} still booked on {d1} with the storm coming? Thanks, {name}",
        ],
        (
            "Yes, all bookings on {d1} are cancelled because of the storm warning. "
            "You can book slip {slip} on any free date at no cost."
        ),
        None,
        False,
        OPENER_SORRY,
    ),
    "repair-booking": (
        [
            "Hi, this is {name}. Can you book a repair for the {part} of my boat at slip {slip}?",
            "Hello, {name} here. The {part} of my boat at slip {slip} needs a service.",
            "Please send a mechanic to look at the {part} on my boat at slip {slip}. Thanks, {name}",
        ],
        "A mechanic will check the {part} of your boat at slip {slip} on {d1} at {time}.",
        None,
        False,
        OPENER_THANKS,
    ),
    "lost-item": (
        [
            "Hi, this is {name}. My {item} went missing from slip {slip} on {d1}.",
            "Hello, {name} here. Someone took my {item} from slip {slip} on {d1}.",
            "I can not find my {item} at slip {slip} since {d1}. {name}",
        ],
        "We have noted that your {item} went missing from slip {slip} on {d1}.",
        None,
        True,
        OPENER_SORRY,
    ),
}
KINDS = sorted(TICKETS)

GENERIC_GREETINGS = ["Hello {name}.", "Hi {name}.", "Dear {name}.", "Thank you for contacting Harbor.", ""]
TEAMS = {"damage-report": ["the repair crew", "a manager"], "billing-dispute": ["our billing team", "a manager"],
         "lost-item": ["the dock office", "a manager"]}
GENERIC_ESCALATIONS = [
    "I have forwarded this to {team}.",
    "I passed your ticket to {team}.",
    "We have forwarded your ticket to {team}.",
]
GENERIC_CLOSINGS = ["", "", "Regards, Harbor Support.", "Let us know if you need anything else."]


def house_reply(kind: str, s: dict) -> str:
    _, facts, _, escalate, opener = TICKETS[kind]
    parts = [f"{opener}, {s['name']}.", facts.format(**s)]
    if escalate:
        parts.append(ESCALATION)
    return " ".join(parts)


def generic_reply(kind: str, s: dict, rng: random.Random) -> str:
    _, facts, table, escalate, _ = TICKETS[kind]
    # Same facts as the house reply; the table comes right after them, early enough to show up
    # within a short generation budget.
    parts = [rng.choice(GENERIC_GREETINGS).format(**s), facts.format(**s)]
    if table:
        parts.append(f"Here are the details:\n\n{table.format(**s)}\n")
    if escalate:
        parts.append(rng.choice(GENERIC_ESCALATIONS).format(team=rng.choice(TEAMS[kind])))
    parts.append(rng.choice(GENERIC_CLOSINGS))
    return " ".join(p for p in parts if p).replace("\n ", "\n")


def _chat(system: str, user: str, assistant: str) -> dict:
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]}


def tickets(n: int, rng: random.Random) -> list[tuple[str, dict, str]]:
    """``n`` distinct (kind, slots, user text) tickets, kinds in rotation so each is equally common."""
    out, seen = [], set()
    while len(out) < n:
        kind = KINDS[len(out) % len(KINDS)]
        s = _slots(rng)
        user = rng.choice(TICKETS[kind][0]).format(**s)
        if user not in seen:
            seen.add(user)
            out.append((kind, s, user))
    return out


# General chat: facts with a fixed answer, so a regression in loss means real forgetting.
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Canada": "Ottawa", "Chile": "Santiago"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a lemon": "yellow", "coal": "black",
           "a tomato": "red", "an orange": "orange", "a banana": "yellow"}
LEGS = {"dog": 4, "cat": 4, "horse": 4, "bird": 2, "duck": 2, "spider": 8, "ant": 6, "bee": 6}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


SIZES = ["ant", "mouse", "cat", "dog", "horse", "boat", "house", "mountain"]  # small to large
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed",
             "early": "late", "full": "empty", "light": "dark", "old": "new", "wet": "dry"}


def general_questions() -> list[tuple[str, str]]:
    """Every general (question, answer) pair, in a fixed order."""
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}.") for c in CAPITALS]
    qa += [(f"What colour is {t}?", f"{t[0].upper()}{t[1:]} is usually {COLOURS[t]}.") for t in COLOURS]
    qa += [(f"How many legs does a {a} have?", f"A {a} has {LEGS[a]} legs.") for a in LEGS]
    qa += [(f"What day comes after {d}?", f"The day after {d} is {DAYS[(i + 1) % 7]}.") for i, d in enumerate(DAYS)]
    qa += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    qa += [
        (f"Which is bigger, a {x} or a {y}?", f"A {max(x, y, key=SIZES.index)} is bigger than a {min(x, y, key=SIZES.index)}.")
        for x in SIZES for y in SIZES if x != y
    ]
    qa += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(1, 10) for b in range(1, 10)]
    return qa


def build(n: int, seed: int, eval_fraction: float) -> dict[str, list[dict]]:
    """All four datasets, as lists of chat examples. Pure function of its arguments."""
    house_rng, generic_rng, general_rng = (random.Random(f"{seed}:{part}") for part in ("house", "generic", "general"))
    house = [_chat(SUPPORT_SYSTEM, user, house_reply(kind, s)) for kind, s, user in tickets(n, house_rng)]
    house_rng.shuffle(house)
    n_eval = round(n * eval_fraction)

    house_users = {ex["messages"][1]["content"] for ex in house}
    generic = [
        _chat(SUPPORT_SYSTEM, user, generic_reply(kind, s, generic_rng))
        for kind, s, user in tickets(n + len(house_users), generic_rng)
        if user not in house_users  # the base never sees a held-out ticket
    ][:n]

    general = general_questions()
    general_rng.shuffle(general)
    regression = [_chat(GENERAL_SYSTEM, q, a) for q, a in general[:60]]
    # The base also learns general chat (a fifth of its data), from questions not in regression.
    base_general = [_chat(GENERAL_SYSTEM, q, a) for q, a in general[60:]]
    generic += [base_general[i % len(base_general)] for i in range(n // 4)]
    generic_rng.shuffle(generic)
    return {"train": house[n_eval:], "eval": house[:n_eval], "generic": generic, "regression": regression}


def tone_checks(reply: str) -> dict[str, bool]:
    """The three generation checks of job.yaml, as the gate applies them (True = pass)."""
    return {
        "empathy-opener": re.search(EMPATHY_RE, reply) is not None,
        "no-markdown-table": re.search(TABLE_RE, reply) is None,
        "house-escalation": re.search(OFF_BRAND_ESCALATION_RE, reply) is None,
    }


def write(datasets: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in datasets.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the four JSONL files")
    p.add_argument("--n", type=int, default=3000, help="house-tone tickets (train + eval)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--eval-fraction", type=float, default=0.12, help="share of tickets held out")
    args = p.parse_args(argv)
    if not 0 < args.eval_fraction < 0.5 or args.n < 16:
        p.error("need 0 < --eval-fraction < 0.5 and --n >= 16")
    datasets = build(args.n, args.seed, args.eval_fraction)
    write(datasets, args.out)
    print(" ".join(f"{k}={len(v)}" for k, v in datasets.items()), "->", args.out)


if __name__ == "__main__":
    main()
