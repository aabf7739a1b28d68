"""Generate the embedded demo task for ``sftlab train``: date normalisation.

Task
----
The user message is a calendar date written in English, e.g. ``March 5, 2021``
(also ``5 March 2021`` and abbreviated month forms such as ``Sep 14, 1987``).
The assistant must answer with exactly the ISO-8601 date ``2021-03-05`` and
nothing else.  A short system message states the instruction, which keeps each
example at roughly 50 tokens with the ChatML template.

Why this task
-------------
* Answers are deterministic and checked by exact string equality after
  ``.strip()`` (see :func:`check`).
* The base SmolLM2-135M-Instruct model essentially never produces the bare
  ISO string (it answers in prose, mis-maps months, forgets zero padding),
  so its exact-match accuracy is ~0%.  A dozen or so optimizer steps of full
  fine-tuning are enough to teach the mapping (month name -> number, zero
  padding, field order), so the demo shows a large, real gain on CPU.
  Measured (greedy decoding, 100 eval rows): base 1/100; after 12 AdamW steps
  of 48 examples (~2.6k tokens/step, lr 1e-4, 1 warmup step, linear decay,
  clip 1.0, full fine-tuning in float32) 100/100.

No leakage
----------
Dates are drawn without replacement from a seeded RNG, so the train and eval
sets contain disjoint (year, month, day) triples, hence disjoint inputs.

Usage::

    python -m sftlab.demo.make_task          # or python src/sftlab/demo/make_task.py

writes ``train.jsonl`` and ``eval.jsonl`` next to this file.  Each line is
``{"messages": [system, user, assistant]}``; the assistant content is the
reference answer.
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 400
N_EVAL = 100
YEAR_MIN, YEAR_MAX = 1950, 2049

SYSTEM = "Rewrite the date as YYYY-MM-DD. Reply with the date only."

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

OUT_DIR = Path(__file__).resolve().parent


def render(year: int, month: int, day: int, style: int) -> str:
    """Render a date in one of the supported English input styles."""
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{day} {MONTHS[month - 1]} {year}"
    return f"{ABBR[month - 1]} {day}, {year}"


def iso(year: int, month: int, day: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"


def example(year: int, month: int, day: int, style: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": render(year, month, day, style)},
            {"role": "assistant", "content": iso(year, month, day)},
        ]
    }


def check(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def make(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL):
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    dates: list[tuple[int, int, int]] = []
    while len(dates) < n_train + n_eval:
        y = rng.randint(YEAR_MIN, YEAR_MAX)
        m = rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        dates.append((y, m, d))
    rows = [example(y, m, d, rng.randrange(3)) for (y, m, d) in dates]
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    train, ev = make()
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "eval.jsonl", ev)
    print(f"wrote {len(train)} train / {len(ev)} eval rows to {OUT_DIR}")


if __name__ == "__main__":
    main()
