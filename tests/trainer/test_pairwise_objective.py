"""An example of several sequences, end to end: a pairwise preference objective, written here and not in
sftlab, trains on (prompt, chosen, rejected) pairs through the objective seam with no change to the loop.

No row format reads pairs yet, so the test reads them itself: `read_pairs` stands in for the source
reader (data/reading.py `prepare_source`) and writes each row as a group of two sequences, chosen then
rejected, with a side array `weight`, into a grouped store in the data cache (data/store.py). From
there on everything is the run's own code: the cache (a second run loads the entry), the length policy
(a pair with an over-long member is dropped whole), mixing and the eval split, `Examples`, the
micro-batch order, `pad_collate` (members stacked, `group_index` / `group_member` / `group_weight`),
trainer/loop.py, evaluation and the step records."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, write_group_store, write_jsonl

import sftlab
from sftlab.data import dataset, store
from sftlab.data.collate import epoch_order, model_inputs
from sftlab.data.types import IGNORE_INDEX
from sftlab.model.loss import model_forward

ROWS = [  # prompt, chosen, rejected, weight; chosen and rejected of about one length
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "The capital of France is Rome.",
        1.0,
    ),
    ("Convert March 5, 2021 to YYYY-MM-DD.", "2021-03-05", "2021-05-03", 1.0),
    ("Tell me a joke.", "Why did the chicken cross the road?", "Why did the fox jump over the dog?", 0.5),
    ("Count from one.", "one two three four five", "five four three two one", 2.0),
    ("Say hello.", "Hello! How can I help you today?", "Hello! How can you help me today?", 1.0),
    ("Name some fruit.", "apples, bananas, cherries.", "the lazy dog, the brown fox.", 1.0),
    ("What comes after nine?", "ten", "eleven", 1.5),
    ("Give me a list.", "apples, bananas, cherries.", "cherries, bananas, apples.", 1.0),
    ("Say a long thing.", "Sure.", "the quick brown fox jumps over the lazy dog " * 8, 1.0),  # over: dropped
]
MAX_SEQ_LENGTH = 48


class PairPreference:
    """-logsigmoid(logp(chosen) - logp(rejected)) of each pair, times its weight, summed; normaliser: the
    pairs. logp(sequence): the summed log-likelihood of its target tokens (its answer)."""

    def attach(self, loss_fn):
        pass  # it computes each member's log-likelihood from the full logits

    def loss_sum(self, model, batch):
        logits = model_forward(model, model_inputs(batch)).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        logp = -nll.sum(dim=1)  # one per row, i.e. per member; rows are group after group, chosen first
        member = batch["group_member"]
        chosen, rejected = logp[member == 0], logp[member == 1]
        losses = -F.logsigmoid(chosen - rejected) * batch["group_weight"]
        return losses[self._live(batch)].sum()

    def _live(self, batch) -> torch.Tensor:
        """The pairs that carry targets (none in a filler batch)."""
        return (batch["labels"][batch["group_member"] == 0, 1:] != IGNORE_INDEX).any(dim=1)

    def normaliser(self, batch):
        return int(self._live(batch).sum())

    def filler(self, batch):
        return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}

    def record(self, loss_sum, normaliser, prefix=""):
        loss = loss_sum / normaliser if normaliser else float("nan")
        return {f"{prefix}loss": loss} if prefix else {"loss": loss, "pairs": normaliser}


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The prompt (no loss) then the answer and EOS (targets)."""
    head = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def read_pairs(source, tokenizer, cfg, template, processor=None, reads=None):
    """The source's rows as pairs in a grouped store, through the data cache (keyed by content and
    tokenizer; a second run loads the entry)."""
    root = store.cache_dir(cfg.cache_dir)
    key = store.cache_key(
        {"source": source.fingerprint(), "tokenizer": store.tokenizer_fingerprint(tokenizer), "rows": "pairs"}
    )
    cached = store.load(root, key)
    if cached is not None:
        return cached
    reads.append(source.name)
    path = source.files[0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tmp = store.new_entry_dir(root, key)
    groups = [[encode(tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected")] for r in rows]
    data = store.SourceData(files=[(str(path), "line")], rows=len(rows))
    data.arrays = write_group_store(tmp, groups, side={"weight": [r["weight"] for r in rows]})
    data.arrays = store.TokenArrays(store.commit(tmp, root, key, data, {"rows": "pairs"}))
    return data


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Pairs sources are read by `read_pairs`; the list names each source it had to read (not cached)."""
    done: list[str] = []
    monkeypatch.setattr(dataset, "prepare_source", lambda *a, **k: read_pairs(*a, **k, reads=done))
    return done


def config(tiny_model_dir, tmp_path, micro=4, accum=1, steps=1, lr=1e-3, **train) -> dict:
    rows = [{"prompt": p, "chosen": c, "rejected": r, "weight": w} for p, c, r, w in ROWS]
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {
            "train": str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
            "max_seq_length": MAX_SEQ_LENGTH,
            "on_overlength": "drop",
            "eval_fraction": 0.25,
        },
        "optim": {"lr": lr, "warmup_steps": 0},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "micro_batch_size": micro,
            "grad_accum_steps": accum,
            "max_steps": steps,
            "mixed_precision": "no",
            "num_epochs": 100,
            **train,
        },
    }


def pair_losses(model, groups) -> list[float]:
    """Each pair's weighted loss, every member run through the model on its own (no padding)."""
    out = []
    for group in groups:
        logp = []
        for m in group.members:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([m.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(m.labels[1:])
            keep = labels != IGNORE_INDEX
            logp.append(-F.cross_entropy(logits[keep], labels[keep], reduction="sum").item())
        out.append(float(group.side["weight"]) * -F.logsigmoid(torch.tensor(logp[0] - logp[1])).item())
    return out


@pytest.mark.parametrize("micro,accum", [(4, 1), (2, 2)], ids=["one-batch", "accumulated"])
def test_a_pairwise_objective_trains_on_pairs_through_the_seam(
    tiny_model_dir, tokenizer, tmp_path, reads, micro, accum
):
    cfg = config(tiny_model_dir, tmp_path, micro, accum)
    data = sftlab.prepare(cfg)
    stats = data.report.sources[0]
    assert (stats.rows, stats.dropped, len(data.train), len(data.eval)) == (9, 1, 6, 2)  # the long pair: out
    assert data.train.grouped and all(len(g.members) == 2 for g in [*data.train, *data.eval])
    result = sftlab.train(cfg, objective=PairPreference())
    assert reads == [str(tmp_path / "pairs.jsonl")]  # read once: the run loaded the cached grouped entry
    first = result.history[0]
    assert first["pairs"] == 4 and "target_tokens" not in first
    # step 1 saw the first 4 pairs of epoch 0's seeded order, before any update
    picked = [data.train[i] for i in epoch_order(len(data.train), 42, 0)[:4]]
    expected = pair_losses(build_model(len(tokenizer)), picked)
    assert first["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert math.isfinite(result.history[-1]["eval_loss"])  # validation asked the same objective


def test_the_preference_is_learnt_and_sft_still_trains_on_every_member(
    tiny_model_dir, tokenizer, tmp_path, reads
):
    cfg = config(tiny_model_dir, tmp_path, steps=12, lr=1e-2)
    data = sftlab.prepare(cfg)
    result = sftlab.train(cfg, objective=PairPreference())
    trained = type(build_model(len(tokenizer))).from_pretrained(tmp_path / "run")
    before, after = pair_losses(build_model(len(tokenizer)), data.train), pair_losses(trained, data.train)
    assert sum(after) < 0.5 * sum(before)  # chosen now likelier than rejected on the training pairs
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the default objective on the same pairs: next-token NLL over every member's answer
    sft = sftlab.train(cfg, **{"train.output_dir": str(tmp_path / "sft"), "train.max_steps": 1})
    picked = [data.train[i] for i in epoch_order(len(data.train), 42, 0)[:4]]
    assert sft.history[0]["target_tokens"] == sum(g.num_targets for g in picked)
