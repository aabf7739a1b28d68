"""Sources become the train and eval sets (dataset.py): formats, bad rows (named by file:line and field), the
length policy, the eval split; rows with image content parts make a source one clear error, before
training, naming the file, the first rows and their count (a text-only model cannot train on images);
mixing by weight (fraction / count / once), seeded, eval held out of the mix or from eval sources.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_tokenizer, write_jsonl

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.dataset import DataError, build_datasets, check_weight, hold_out, mix, select
from sftlab.data.types import IGNORE_INDEX

GOOD = {
    "messages": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
    ]
}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLAB_DATA_CACHE", raising=False)
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def cfg_for(path, **kw) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=str(path))], **kw)


def targets(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_bad_rows_are_skipped_counted_and_located(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            GOOD,
            '{"messages": [{"role": "user", "content": "hi"}',  # line 2: invalid JSON
            {"messages": [{"role": "user", "content": "no answer"}]},  # line 3: no assistant turn
            {
                "messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]
            },  # line 4
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},  # line 5
            GOOD,
            {"prompt": "Numbers: one", "completion": "two"},
        ]
        * 2,
    )
    train, evals, report = build_datasets(cfg_for(path, max_bad_fraction=0.6), tokenizer, seed=0)
    assert len(train) == 6 and report.bad == 8 and report.rows == 14
    text = "\n".join(report.bad_examples)
    assert f"{path}:2: invalid JSON" in text
    assert f"{path}:3 field 'messages': no assistant turn" in text
    assert f"{path}:4 field 'messages[0].role': unknown role 'wizard'" in text
    assert f"{path}:5 field 'messages[0].content': must be a string" in text


def test_on_bad_record_error_stops_with_location(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json"])
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        build_datasets(cfg_for(path, on_bad_record="error"), tokenizer, seed=0)


def test_non_utf8_line_is_reported(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    train, _, report = build_datasets(cfg_for(path), tokenizer, seed=0)
    assert len(train) == 1 and "d.jsonl:2: not valid UTF-8" in report.bad_examples[0]


def test_too_many_bad_rows_fails_before_training(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + ["{"] * 3)
    with pytest.raises(DataError, match="3 of 4 rows are bad"):
        build_datasets(cfg_for(path, max_bad_fraction=0.5), tokenizer, seed=0)


def test_max_bad_fraction_applies_to_each_source(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD] + ["{"] * 3)  # 3 of 4 bad: above 0.5 on its own
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 12)  # together: 3 of 16 bad, below 0.5
    cfg = DataConfig(train=[SourceConfig(path=str(good)), SourceConfig(path=str(bad))], max_bad_fraction=0.5)
    with pytest.raises(DataError) as e:
        build_datasets(cfg, tokenizer, seed=0)
    msg = str(e.value)
    assert msg.startswith(f"train source {bad}: 3 of 4 rows are bad (> data.max_bad_fraction=0.5")
    assert f"{bad}:2: invalid JSON" in msg and str(good) not in msg
    cfg.max_bad_fraction = 0.75  # at the limit: trained, without its bad rows
    train, _, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 13 and report.bad == 3


def test_a_source_left_without_examples_is_an_error_naming_it(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 4)
    bad = write_jsonl(tmp_path / "chat.jsonl", ["{"] * 2)
    long = {
        "messages": [
            {"role": "user", "content": "one two three " * 40},
            {"role": "assistant", "content": "four"},
        ]
    }
    too_long = write_jsonl(tmp_path / "long.jsonl", [long] * 2)
    cfg = DataConfig(
        train=[SourceConfig(path=str(good))],
        max_bad_fraction=1.0,
        max_seq_length=128,
        eval=[SourceConfig(path=str(good), name="gsm"), SourceConfig(path=str(bad), name="chat")],
    )
    with pytest.raises(DataError) as e:  # every row bad, even where any fraction of bad rows is allowed
        build_datasets(cfg, tokenizer, seed=0)
    assert str(e.value).startswith(f"eval set 'chat' ({bad}): no examples left: all 2 rows are bad")
    assert f"{bad}:1: invalid JSON" in str(e.value)
    cfg.eval = [SourceConfig(path=str(good))]
    cfg.train = [SourceConfig(path=str(good)), SourceConfig(path=str(too_long))]
    with pytest.raises(
        DataError,
        match=rf"train source {too_long}: no examples left: its 2 examples are longer than "
        r"data.max_seq_length=128 \(data.on_overlength=drop\)",
    ):
        build_datasets(cfg, tokenizer, seed=0)


def test_missing_source(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        build_datasets(cfg_for(tmp_path / "nope.jsonl"), tokenizer, seed=0)


def test_prompt_completion_labels_only_completion(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Numbers: one two", "completion": "three four"}])
    (ex,), _, _ = build_datasets(cfg_for(path), tokenizer, seed=0)
    target = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target) == "three four<|im_end|>"


def test_length_policy_is_never_silent(tmp_path, tokenizer):
    long = {
        "messages": [
            {"role": "user", "content": "one two three " * 40},
            {"role": "assistant", "content": "four"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long])
    train, _, report = build_datasets(cfg_for(path, max_seq_length=128), tokenizer, seed=0)
    assert len(train) == 1 and report.overlength_dropped == 1 and "dropped" in report.summary()
    with pytest.raises(DataError, match="exceed data.max_seq_length=128"):
        build_datasets(cfg_for(path, max_seq_length=128, on_overlength="error"), tokenizer, seed=0)
    # truncation keeps the start; this one loses its only target tokens, so it is dropped and counted
    train, _, report = build_datasets(
        cfg_for(path, max_seq_length=128, on_overlength="truncate"), tokenizer, seed=0
    )
    assert len(train) == 1 and report.no_target_after_truncation == 1


def test_eval_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"prompt": f"Numbers: {i}", "completion": f"{i + 1}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a_train, a_eval, _ = build_datasets(cfg_for(path, eval_fraction=0.25), tokenizer, seed=7)
    b_train, b_eval, _ = build_datasets(cfg_for(path, eval_fraction=0.25), tokenizer, seed=7)
    assert len(a_eval) == 5 and len(a_train) == 15
    assert [e.input_ids for e in a_eval] == [e.input_ids for e in b_eval]
    assert not {tuple(e.input_ids) for e in a_eval} & {tuple(e.input_ids) for e in a_train}


def test_alpaca_and_sharegpt_rows_train_on_the_answer(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Convert the date.", "input": "March 5, 2021", "output": "2021-03-05"},
            {
                "conversations": [
                    {"from": "human", "value": "Hello!"},
                    {"from": "gpt", "value": "How can I help?"},
                ]
            },
        ],
    )
    (alpaca, sharegpt), _, _ = build_datasets(cfg_for(path), tokenizer, seed=0)
    assert targets(tokenizer, alpaca) == "2021-03-05<|im_end|>"
    assert "Convert the date.\n\nMarch 5, 2021" in tokenizer.decode(alpaca.input_ids)
    assert targets(tokenizer, sharegpt) == "How can I help?<|im_end|>"


def test_text_rows_mask_spans_and_end_with_eos(tmp_path, tokenizer):
    text = "the quick brown fox"
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": text, "loss_masking_spans": [[4, 8]]},  # "quick", inclusive
            {"text": text + "<|im_end|>"},  # already ends with EOS: not doubled
            {"text": text, "loss_masking_spans": [[4, 19]]},  # end == len(text): out of range
        ],
    )
    (masked, plain), _, report = build_datasets(cfg_for(path), tokenizer, seed=0)
    assert "quick" not in targets(tokenizer, masked) and targets(tokenizer, masked).endswith("fox<|im_end|>")
    assert (
        masked.input_ids[-1] == tokenizer.eos_token_id and plain.input_ids.count(tokenizer.eos_token_id) == 1
    )
    assert plain.labels[1:] == plain.input_ids[1:]
    assert f"{path}:3 field 'loss_masking_spans[0]': span [4, 19] is out of range" in report.bad_examples[0]


def test_pretokenized_rows_are_checked_against_the_vocabulary(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]},
            {"input_ids": [5, len(tokenizer)]},
            {"input_ids": [5, 6], "labels": [-100, -100]},
        ],
    )
    (ex,), _, report = build_datasets(cfg_for(path, max_bad_fraction=0.7), tokenizer, seed=0)
    assert ex.input_ids == [5, 6, 7] and ex.labels == [-100, -100, 7]
    assert (
        f"{path}:2 field 'input_ids[1]': token id {len(tokenizer)} is outside the vocabulary"
        in report.bad_examples[0]
    )
    assert f"{path}:3: no target tokens" in report.bad_examples[1]


def test_summary_names_sources_bad_rows_and_length_policy(tmp_path, tokenizer):
    long = {
        "messages": [
            {"role": "user", "content": "one two three " * 40},
            {"role": "assistant", "content": "four"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, long, "{"])
    train, _, report = build_datasets(cfg_for(path, max_seq_length=128), tokenizer, seed=0)
    first, source, details = report.summary().splitlines()
    assert first.startswith("2 examples kept of 4 rows (train 2, eval 0")
    assert "1 bad rows skipped" in first and "1 over max_seq_length dropped" in first
    assert source == (
        f"  train[0] {path}: 4 rows, 1 bad, 3 examples, 1 over length dropped -> 2 train"
        " (direct ChatML rendering, checked against the template)"
    )
    n = len(train[0].input_ids)  # the two kept examples are the same row
    targets = sum(label != IGNORE_INDEX for label in train[0].labels)
    assert details == (
        f"    format: messages (3 rows); targets: {targets / n:.1%} of {2 * n} tokens; "
        f"lengths: min {n}, median {n}, p95 {n}, max {n} tokens"
    )


def test_cli_prepare_builds_the_cache_then_reuses_it(tmp_path, tiny_model_dir, capsys):
    from sftlab.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\n"  # max_seq_length within its 512 positions
        f"data: {{train: [{{path: {data}}}], max_seq_length: 256}}\n"
    )
    assert main(["prepare", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert "3 examples kept of 3 rows" in first and "(cached)" not in first
    assert main(["prepare", str(cfg), "data.max_seq_length=512"]) == 0
    assert "(cached)" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1


def test_text_rows_need_no_chat_template_but_chat_rows_do(tmp_path):
    plain = build_tokenizer(template=None)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}])
    (ex,), _, _ = build_datasets(cfg_for(text), plain, seed=0)
    assert ex.input_ids[-1] == plain.eos_token_id
    chat = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(DataError, match="c.jsonl: chat rows need a chat template"):
        build_datasets(cfg_for(chat), plain, seed=0)
    with pytest.raises(DataError, match="data.chat_template: unknown chat template 'nope'"):
        build_datasets(cfg_for(chat, chat_template="nope"), plain, seed=0)
    (ex,), _, _ = build_datasets(cfg_for(chat, chat_template="chatml"), plain, seed=0)
    assert ex.num_targets > 0


def test_rows_the_template_refuses_are_bad_records(tmp_path, tokenizer):
    tpl = tmp_path / "no_tools.jinja"
    tpl.write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tool = {"messages": [GOOD["messages"][0], {"role": "tool", "content": "42"}, GOOD["messages"][1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, tool, GOOD])
    train, _, report = build_datasets(cfg_for(path, chat_template=str(tpl)), tokenizer, seed=0)
    assert len(train) == 2 and report.bad == 1
    assert report.bad_examples[0].startswith(f"{path}:2 field 'messages': the chat template cannot render")


def test_truncation_inside_an_assistant_turn_is_reported(tmp_path, tokenizer):
    long_answer = {
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "one two three " * 40},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_answer])
    train, _, report = build_datasets(
        cfg_for(path, max_seq_length=128, on_overlength="truncate"), tokenizer, seed=0
    )
    cut = max(train, key=lambda e: len(e.input_ids))
    assert len(cut.input_ids) == 128 and cut.labels[-1] != IGNORE_INDEX  # keeps the start of the answer
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in [
        t for t, lab in zip(cut.input_ids, cut.labels) if lab != IGNORE_INDEX
    ]
    assert report.overlength_truncated == 1 and report.truncated_inside_turn == 1
    assert "1 cut inside a trained turn" in report.summary()


@pytest.mark.parametrize("name", ["phi3", "phi3_5", "gpt_oss"])
def test_multi_turn_rows_of_phi3_and_gpt_oss_are_kept_and_masked_as_the_tagged_twin(tmp_path, name):
    """Phi-3 writes eos after the final message only; gpt-oss closes the final turn differently: once refused."""
    from test_tokenize import GPT_OSS_CHATS, PHI3_CHATS, family, twin_reference

    tok, text = family(name)
    chats = [
        c
        for c in (GPT_OSS_CHATS if name == "gpt_oss" else PHI3_CHATS).values()
        if c[0]["role"] != "developer"
    ]
    tpl = tmp_path / f"{name}.jinja"
    tpl.write_text(text, encoding="utf-8")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in chats])
    train, _, report = build_datasets(cfg_for(path, chat_template=str(tpl)), tok, seed=0)
    assert report.bad == 0 and len(train) == len(chats)
    got = sorted((list(e.input_ids), [int(lab != IGNORE_INDEX) for lab in e.labels]) for e in train)
    assert got == sorted(twin_reference(name, c) for c in chats)


def test_add_bos_starts_chat_examples_with_an_untrained_bos(tmp_path):
    from conftest import build_tokenizer, chat_rows, write_jsonl

    from sftlab.config.schema import DataConfig
    from sftlab.data.dataset import build_datasets

    tok = build_tokenizer()
    tok.bos_token = "<|endoftext|>"  # a BOS the ChatML template never writes
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows()[:2])
    examples = {}
    for add_bos in (False, True):
        cfg = DataConfig(train=[{"path": str(path)}], add_bos=add_bos, cache_dir=str(tmp_path / "cache"))
        train, _, _ = build_datasets(cfg, tok, seed=0)
        examples[add_bos] = sorted(([*train[i].input_ids], [*train[i].labels]) for i in range(len(train)))
    bos = tok.bos_token_id
    assert len(examples[True]) == len(examples[False]) == 2
    for (ids, labels), (bos_ids, bos_labels) in zip(examples[False], examples[True]):
        assert ids[0] != bos and bos_ids == [bos, *ids] and bos_labels == [-100, *labels]


# --- rows with images on a text-only model ----------------------------------------------------------------

TEXT = {
    "messages": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi. How can I help?"},
    ]
}
IMAGE = {
    "messages": [  # an OpenAI/HF vision row, as in LLaMA-Factory's mllm demos after conversion
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "cat.png"}},
                {"type": "text", "text": "What is this?"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
    ]
}


def build(tokenizer, path, **kw):
    return build_datasets(DataConfig(train=[SourceConfig(path=str(path))], **kw), tokenizer, seed=0)


@pytest.mark.parametrize(
    "kw",
    [{}, {"max_bad_fraction": 1.0}, {"on_bad_record": "error"}],
    ids=["default", "any-bad-fraction", "strict"],
)
def test_image_rows_are_one_error_naming_the_file_rows_and_count(tmp_path, tokenizer, kw):
    path = write_jsonl(tmp_path / "vl.jsonl", [TEXT, IMAGE, TEXT] + [IMAGE] * 8)
    with pytest.raises(DataError) as e:
        build(tokenizer, path, **kw)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith(f"data source {path}: 9 of 11 rows have images")
    assert f"({path} lines 2, 4, 5, 6, 7 and 4 more; the first: field 'messages[0].content[0]')" in msg
    assert "need a vision-language model" in msg and "text-only model" in msg and "docs/vision.md" in msg
    with pytest.raises(DataError, match="9 of 11 rows have images"):  # nothing was cached as skipped
        build(tokenizer, path, **kw)


def test_image_rows_across_chunks_and_worker_processes_are_all_counted(tmp_path, tokenizer):
    rows = [IMAGE if i % 100 == 7 else TEXT for i in range(1100)]  # 3 chunks of 512 rows
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(DataError) as e:
        build(tokenizer, path, num_proc=2)
    assert "11 of 1100 rows have images" in str(e.value)
    assert f"{path} lines 8, 108, 208, 308, 408 and 6 more" in str(e.value)


def test_image_rows_of_a_parquet_file_are_cited_by_1_based_row(tmp_path, tokenizer):
    answer = {
        "role": "assistant",
        "content": [{"type": "text", "text": "A cat."}],
    }  # a column holds one type: parts
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}, answer]}
    image = {"messages": [IMAGE["messages"][0], answer]}
    pq.write_table(pa.Table.from_pylist([image, text, image]), tmp_path / "vl.parquet")
    with pytest.raises(DataError, match=r"2 of 3 rows have images \(\S*vl.parquet rows 1, 3;"):
        build(tokenizer, tmp_path / "vl.parquet")


def test_text_rows_and_other_bad_rows_are_unchanged(tmp_path, tokenizer):
    audio = {"messages": [{"role": "user", "content": [{"type": "audio"}]}, TEXT["messages"][1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [TEXT] * 4 + [audio])
    train, _, report = build(tokenizer, path)
    assert len(train) == 4 and report.bad == 1
    assert report.bad_examples == [
        f"{path}:5 field 'messages[0].content[0]': must be a content part "
        '{"type": "text", "text": "..."}, got {\'type\': \'audio\'}'
    ]


def test_llamafactory_images_column_with_markers_is_the_same_one_error(tmp_path, tokenizer):
    """LLaMA-Factory's mllm_demo.json: `<image>` markers in the text and an `images` column. A text-only run
    would train on the literal `<image>` text without the picture: the source is refused, naming the rows."""
    mllm = {
        "messages": [
            {"role": "user", "content": "<image>Who are they?"},
            {"role": "assistant", "content": "Two football players."},
        ],
        "images": ["mllm_demo_data/1.jpg"],
    }
    path = tmp_path / "mllm_demo.json"
    path.write_text(json.dumps([mllm, TEXT, {**mllm, "images": []}, mllm]))
    with pytest.raises(DataError) as e:
        build(tokenizer, path)
    msg = str(e.value)
    assert msg.startswith(
        f"data source {path}: 2 of 4 rows have images ({path} rows 1, 4; the first: field 'images')"
    )
    assert "text-only model" in msg


def test_the_heap_is_frozen_while_the_workers_run_and_thawed_after(tmp_path, tokenizer, monkeypatch):
    """Forked workers share the main process's heap; frozen, the collector's passes (in the workers and
    here) do not write to those pages, which would give every process a private copy of them."""
    import gc

    from sftlab.data.store import ArrayWriter

    seen = []
    real = ArrayWriter.add_examples
    monkeypatch.setattr(
        ArrayWriter, "add_examples", lambda self, *a: seen.append(gc.get_freeze_count()) or real(self, *a)
    )
    path = write_jsonl(tmp_path / "rows.jsonl", [TEXT] * 600)
    assert len(build(tokenizer, path, num_proc=2)[0]) == 600
    assert len(seen) == 2 and min(seen) > 0 and gc.get_freeze_count() == 0
    seen.clear()
    assert len(build(tokenizer, path, num_proc=1, cache=False)[0]) == 600
    assert seen == [0, 0]  # one process: nothing to share, nothing frozen


# --- mixing by weight, and the eval split ----------------------------------------------------------------


def L(selection):  # noqa: N802 - selections as plain lists, for comparisons
    return [a.tolist() for a in selection]


def test_select_rules():
    rng = random.Random(0)
    assert (
        select(10, None, rng).tolist()
        == list(range(10))
        == select(10, 1, rng).tolist()
        == select(10, 1.0, rng).tolist()
    )
    frac = select(10, 0.3, rng)
    assert len(frac) == 3 and len(set(frac)) == 3
    assert len(select(10, 0.01, rng)) == 1  # a fraction never empties a source
    many = Counter(select(4, 10, rng).tolist())
    assert sum(many.values()) == 10 and set(many) == {0, 1, 2, 3} and sorted(many.values()) == [2, 2, 3, 3]
    small = select(10, 3, rng)
    assert len(small) == 3 and len(set(small)) == 3
    assert select(0, 5, rng).tolist() == []


def test_mix_is_seeded_and_sources_are_independent():
    assert L(mix([10, 20], [0.5, 7], seed=1)) == L(mix([10, 20], [0.5, 7], seed=1))
    assert L(mix([10, 20], [0.5, 7], seed=1)) != L(mix([10, 20], [0.5, 7], seed=2))
    assert L(mix([10, 20, 5], [0.5, 7, None], seed=1))[:2] == L(mix([10, 20], [0.5, 7], seed=1))


def test_weight_validation():
    check_weight(0.5, "a")
    check_weight(3, "a")
    check_weight(3.0, "a")
    with pytest.raises(DataError, match="weight 2.5 is neither a fraction"):
        check_weight(2.5, "a")


def test_hold_out_is_disjoint_even_with_repeats():
    sel = mix([5, 3], [12, None], seed=0)
    train, evals = hold_out(sel, 0.25, seed=0)
    assert sum(map(len, evals)) == 2  # 25% of 8 distinct examples
    for s in range(2):
        assert not set(train[s].tolist()) & set(evals[s].tolist())
        assert set(train[s].tolist()) | set(evals[s].tolist()) == set(sel[s].tolist())
    again = hold_out(sel, 0.25, seed=0)
    assert (L(again[0]), L(again[1])) == (L(train), L(evals))


def rows(prefix: str, n: int) -> list[dict]:
    return [{"prompt": f"{prefix} {i}", "completion": f"{i}"} for i in range(n)]


def test_build_mixes_and_reports_per_source(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    b = write_jsonl(tmp_path / "b.jsonl", rows("Hello!", 4))
    c = write_jsonl(tmp_path / "c.jsonl", rows("Thanks", 6))
    cfg = DataConfig(
        train=[
            SourceConfig(path=str(a), weight=0.5),
            SourceConfig(path=str(b), weight=10),
            SourceConfig(path=str(c)),
        ]
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=3)
    assert len(train) == 5 + 10 + 6 and len(evals) == 0
    assert [s.used for s in report.sources] == [5, 10, 6]
    summary = report.summary()
    assert f"train[0] {a}: 10 rows, 0 bad, 10 examples -> 5 train (weight 0.5)" in summary
    assert f"train[1] {b}: 4 rows, 0 bad, 4 examples -> 10 train (weight 10)" in summary
    again, _, _ = build_datasets(cfg, tokenizer, seed=3)
    assert [e.input_ids for e in again] == [e.input_ids for e in train]
    other, _, _ = build_datasets(cfg, tokenizer, seed=4)
    assert [e.input_ids for e in other] != [e.input_ids for e in train]


def test_eval_fraction_of_the_mix(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    b = write_jsonl(tmp_path / "b.jsonl", rows("Hello!", 10))
    cfg = DataConfig(
        train=[SourceConfig(path=str(a)), SourceConfig(path=str(b), weight=0.5)], eval_fraction=0.2
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(evals) == 3 and len(train) == 12  # 20% of the 15 mixed examples
    assert not {tuple(e.input_ids) for e in evals} & {tuple(e.input_ids) for e in train}
    assert sum(s.held_out for s in report.sources) == 3 and "eval 3" in report.summary()


def test_separate_eval_sources_take_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows("Numbers:", 10))
    e = write_jsonl(tmp_path / "e.jsonl", rows("Hello!", 10))
    cfg = DataConfig(
        train=[SourceConfig(path=str(a))], eval=[SourceConfig(path=str(e), weight=4)], eval_fraction=0.5
    )
    train, evals, report = build_datasets(cfg, tokenizer, seed=0)
    assert len(train) == 10 and len(evals) == 4  # eval sources win over eval_fraction
    assert f"eval[0] {e}: 10 rows, 0 bad, 10 examples -> 4 eval (weight 4)" in report.summary()


def test_invalid_weight_fails_before_reading(tmp_path, tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "never-read.jsonl"), weight=2.5)])
    with pytest.raises(DataError, match="weight 2.5"):
        build_datasets(cfg, tokenizer, seed=0)
