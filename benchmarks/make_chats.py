"""Seeded generator of the benchmark's second data shape: "real-looking" chat rows, like GSM8K problems
and ShareGPT chats recombined into multi-turn rows (issue 23).

Every row is `{"messages": [...]}`: a system prompt in about a third of them, then 1-6 user/assistant
turns, each turn either a grade-school math word problem with a worked answer (`<<48/2=24>>`
calculator annotations and a final `#### 72`, as in GSM8K) or a chat turn (markdown paragraphs, lists,
code blocks, some non-ASCII text, as in ShareGPT). Turns are added while the row stays under
`MAX_ROW_CHARS` characters, so rows average ~0.9 kB of JSON (ensure_ascii) and the longest are ~3 kB,
like the issue's 887 MB file of a million rows. Only `random.Random(seed)` is used: the same
(n, seed) gives the same rows on any machine, and a shorter run is a prefix of a longer one.

    python benchmarks/make_chats.py 200000 --seed 0 --out /tmp/chats.jsonl
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from make_conversations import SYSTEM_PROMPTS, WORDS, _code, _sentence, write_rows

MAX_ROW_CHARS = 2600  # characters of message content per row (JSON with escapes: up to ~3 kB)
NAMES = [
    "Natalia",
    "Weng",
    "Betty",
    "Julie",
    "James",
    "Albert",
    "Mark",
    "Ken",
    "Alexis",
    "Tina",
    "Randy",
    "Joy",
    "Mrs. Sherman",
    "Kylar",
    "Toulouse",
    "Carla",
    "Greg",
    "Lee",
    "Rosie",
    "Jean",
    "Marie",
    "Tobias",
]
THINGS = [
    "clips",
    "apples",
    "pages",
    "cookies",
    "marbles",
    "stamps",
    "books",
    "eggs",
    "cupcakes",
    "pencils",
    "stickers",
    "tickets",
    "shells",
    "cards",
    "bottles",
    "flowers",
    "sandwiches",
    "toys",
]
UNICODE = [
    "café",
    "naïve",
    "résumé",
    "–",
    "—",
    "“quoted”",
    "…",
    "°C",
    "€",
    "¥",
    "→",
    "✓",
    "😊",
    "👍",
    "数据",
    "模型",
    "训练",
    "こんにちは",
    "Привет",
    "über",
    "façade",
    "½",
    "±",
    "×",
    "µs",
]
SYSTEMS = SYSTEM_PROMPTS + [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "You are ChatGPT, a large language model trained by OpenAI. Answer as concisely as possible.",
    "Solve the math problem step by step. Put the final answer after ####.",
]


def _math(rng: random.Random) -> tuple[str, str]:
    """A GSM8K-like word problem and its worked answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 90), rng.randint(2, 12), rng.randint(1, 40)
    question = (
        f"{name} sold {thing} to {a} of her friends in April, and then she sold {b} times as many "
        f"{thing} in May. "
    ) + " ".join(_sentence(rng, 6, 14) for _ in range(rng.randint(0, 2)))
    question += f" How many {thing} did {name} have left if she started with {a * b + a + c} {thing}?"
    steps, total = [], a
    for _ in range(rng.randint(2, 4)):
        x = rng.randint(2, 60)
        op = rng.choice("+-*")
        new = total + x if op == "+" else total - x if op == "-" else total * x
        steps.append(
            f"{name} has {total} {op} {x} = <<{total}{op}{x}={new}>>{new} {thing} after that step. "
            + _sentence(rng, 3, 8)
        )
        total = new
    return question, "\n".join(steps) + f"\n#### {total}"


def _chat_user(rng: random.Random) -> str:
    text = " ".join(_sentence(rng, 5, 18) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.2:
        text += " " + " ".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.15:
        text += "\n\n" + _code(rng)
    return text


def _chat_assistant(rng: random.Random) -> str:
    parts = [" ".join(_sentence(rng, 6, 18) for _ in range(rng.randint(1, 3)))]
    for _ in range(rng.choices([0, 1, 2, 3], weights=[60, 27, 9, 4])[0]):
        kind = rng.random()
        if kind < 0.35:
            parts.append(
                "\n".join(
                    f"{'-' if rng.random() < 0.5 else str(k + 1) + '.'} **{rng.choice(WORDS)}**: "
                    f"{_sentence(rng, 4, 14)}"
                    for k in range(rng.randint(2, 6))
                )
            )
        elif kind < 0.55:
            parts.append(_code(rng))
        elif kind < 0.7:
            parts.append(
                " ".join(
                    rng.choice(UNICODE) if rng.random() < 0.3 else rng.choice(WORDS)
                    for _ in range(rng.randint(8, 40))
                )
            )
        else:
            parts.append(" ".join(_sentence(rng, 6, 20) for _ in range(rng.randint(2, 5))))
    return "\n\n".join(parts)


def make_chat(rng: random.Random) -> dict[str, Any]:
    """One row: maybe a system prompt, then turns (math or chat) while the row stays under MAX_ROW_CHARS."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    math = rng.random() < 0.4
    used = sum(len(m["content"]) for m in messages)
    for turn in range(rng.choices([1, 2, 3, 4, 5, 6], weights=[66, 18, 7, 4, 3, 2])[0]):
        user, assistant = (
            _math(rng) if math or rng.random() < 0.1 else (_chat_user(rng), _chat_assistant(rng))
        )
        if turn and used + len(user) + len(assistant) > MAX_ROW_CHARS:
            break
        over = used + len(user) + len(assistant) - MAX_ROW_CHARS
        if over > 0:  # the first turn alone is too long: its answer is cut, as a recombined corpus would
            assistant = assistant[: max(1, len(assistant) - over)]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        used += len(user) + len(assistant)
    return {"messages": messages}


def make_chats(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`n` chats, deterministic in (n, seed)."""
    rng = random.Random(seed)
    return (make_chat(rng) for _ in range(n))


def main(argv: list[str] | None = None) -> None:
    write_rows(make_chats, __doc__.splitlines()[0], argv, ensure_ascii=True)


if __name__ == "__main__":
    main()
