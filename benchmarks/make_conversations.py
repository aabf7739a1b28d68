"""Seeded generator of synthetic multi-turn chat conversations for the data-preparation benchmark.

Every conversation is `{"messages": [...]}`: sometimes a system prompt, then 1-4 user/assistant turns.
User turns are short to medium questions; assistant turns vary from one sentence to several paragraphs,
sometimes with a bulleted list, numbers or a small code block, so tokenized lengths spread from a few
dozen to roughly a thousand tokens (SmolLM2 tokenizer: mean ~240, max ~950). The same (n, seed) always gives the
same rows, in the same order, on any machine (only `random.Random(seed)` is used).

    python benchmarks/make_conversations.py 50000 --seed 0 --out /tmp/convs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

WORDS = """
the of and to a in is it that for on with as was be by this are at from or have an they which one you
were her all she there would their we him been has when who will more no if out so said what up its
about into than them can only other new some could time these two may then do first any my now such
like our over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three system data model value
function number process result example question answer method error file table string list memory
network server request response client user account password email address order price product market
customer service report analysis design test version update release feature support problem solution
water energy light temperature pressure distance speed weight volume surface material structure plant
animal cell protein gene history country city river mountain language music color image picture story
chapter book letter word sentence paragraph document page line point reason idea plan project team
company business manager meeting schedule budget cost benefit risk policy rule law court health doctor
patient treatment medicine food recipe kitchen garden house room door window table chair road car
train bus ticket travel hotel weather rain snow summer winter morning evening night week month simple
important different large small early late possible available common specific general clear easy hard
quick slow strong weak high low recent current previous final main basic complete correct accurate
usually often sometimes always never quickly carefully directly exactly probably however therefore
although unless whether instead rather perhaps especially typically generally finally additionally
""".split()

QUESTION_STARTS = [
    "How do I",
    "Can you explain",
    "What is the best way to",
    "Why does",
    "Could you help me",
    "Is it possible to",
    "What happens when",
    "Please describe how to",
    "Tell me about",
    "I need to",
    "Write a short note on",
    "Compare",
    "Summarize",
    "What are the steps to",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and precisely.",
    "You are an expert software engineer. Explain your reasoning and give working code when useful.",
    "You are a friendly tutor who explains concepts step by step to beginners.",
    "You are a careful analyst. State your assumptions, then answer.",
    "Answer in plain English. Avoid jargon unless the user asks for it.",
]
CODE_LINES = [
    "def {a}({b}):",
    "    return {b} + {n}",
    "for {a} in range({n}):",
    "    print({a}, {b})",
    "{a} = [{n}, {m}, {n}]",
    "if {a} > {n}:",
    "    {b} = {a} * {m}",
    "import {a}",
]


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 10_000)))
    if rng.random() < 0.1 and len(words) > 3:
        words[rng.randrange(1, len(words) - 1)] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....!?")


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng, 5, 18) for _ in range(sentences))


def _user(rng: random.Random) -> str:
    question = (
        f"{rng.choice(QUESTION_STARTS)} {' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))}?"
    )
    if rng.random() < 0.4:  # some context before the question
        question = _paragraph(rng, rng.randint(1, 4)) + "\n\n" + question
    return question


def _code(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 8)):
        lines.append(
            rng.choice(CODE_LINES).format(
                a=rng.choice(WORDS), b=rng.choice(WORDS), n=rng.randint(0, 99), m=rng.randint(0, 99)
            )
        )
    return "```python\n" + "\n".join(lines) + "\n```"


def _assistant(rng: random.Random) -> str:
    size = rng.random()
    if size < 0.3:  # short reply
        return _paragraph(rng, rng.randint(1, 2))
    parts = [_paragraph(rng, rng.randint(2, 6))]
    for _ in range(rng.randint(0, 3) if size > 0.6 else 0):
        kind = rng.random()
        if kind < 0.4:
            parts.append("\n".join(f"{k + 1}. {_sentence(rng, 4, 12)}" for k in range(rng.randint(2, 5))))
        elif kind < 0.6:
            parts.append(_code(rng))
        else:
            parts.append(_paragraph(rng, rng.randint(2, 5)))
    return "\n\n".join(parts)


def make_conversation(rng: random.Random) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choices([1, 2, 3, 4], weights=[40, 30, 20, 10])[0]
    for _ in range(turns):
        messages.append({"role": "user", "content": _user(rng)})
        messages.append({"role": "assistant", "content": _assistant(rng)})
    return {"messages": messages}


def make_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` conversations, deterministic in (n, seed); a prefix of a longer run with the same seed."""
    rng = random.Random(seed)
    return [make_conversation(rng) for _ in range(n)]


def write_rows(
    rows: Callable[[int, int], Iterable[dict[str, Any]]],
    description: str,
    argv: list[str] | None = None,
    ensure_ascii: bool = False,
) -> None:
    """The generators' command line: `n [--seed S] [--out FILE]` -> `rows(n, seed)` as JSONL (stdout by default)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("n", type=int, nargs="?", default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSONL file (default: stdout)")
    args = ap.parse_args(argv)
    out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
    try:
        for row in rows(args.n, args.seed):
            out.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
    finally:
        if args.out:
            out.close()


def main(argv: list[str] | None = None) -> None:
    write_rows(make_conversations, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
