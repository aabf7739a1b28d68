"""The objective seam (trainer/objective.py): docs/architecture.md's worked example, a per-example mean
NLL, trains through `sftlab.train(objective=...)` without any change to the loop, and its logged loss is
the hand-computed mean of per-example means, with and without gradient accumulation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import build_model

import sftlab
from sftlab.data.collate import epoch_order, pad_collate
from sftlab.data.types import IGNORE_INDEX

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def doc_objective():
    """The PerExampleMean class, executed from the documentation's code block."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    block = next(b for b in blocks if "class PerExampleMean" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace["PerExampleMean"]


def hand_computed(model, examples, pad_id) -> float:
    batch = pad_collate(list(examples), pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    means = []
    for row in range(len(examples)):
        labels = batch["labels"][row, 1:]
        keep = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[keep], reduction="mean")
        means.append(nll.item())
    return sum(means) / len(means)


@pytest.mark.parametrize("micro,accum", [(8, 1), (4, 2)], ids=["one-batch", "accumulated"])
def test_the_documented_objective_trains_without_loop_changes(
    tiny_model_dir, chat_file, tokenizer, tmp_path, micro, accum
):
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(chat_file), "max_seq_length": 256},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "micro_batch_size": micro,
            "grad_accum_steps": accum,
            "max_steps": 2,
            "mixed_precision": "no",
            "num_epochs": 1,
        },
    }
    data = sftlab.prepare(config)
    objective = doc_objective()()
    result = sftlab.train(config, objective=objective)
    first = result.history[0]
    assert "examples" in first and "target_tokens" not in first and first["examples"] == 8
    # step 1 saw the first 8 examples of epoch 0's seeded order, before any update
    picked = epoch_order(len(data.train), 42, 0)[:8]
    expected = hand_computed(build_model(len(tokenizer)), [data.train[i] for i in picked], data.pad_id)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    # and it is not the token-weighted mean SFT logs
    sft = sftlab.train(config, **{"train.output_dir": str(tmp_path / "sft")})
    assert sft.history[0]["loss"] != pytest.approx(first["loss"], rel=1e-4)


def _examples(vocab: int, n: int = 8) -> list:
    from sftlab.data.types import TokenizedExample

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 6 + 5 * i  # unequal lengths and target counts: the three normalisations differ
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        n_target = 1 + (i * 7) % (length - 2)
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (length - n_target) + ids[length - n_target :]))
    return out


def _token_nll(model, batch) -> torch.Tensor:
    """[B, T-1] next-token NLL of every position (0 where no target), from the model's own logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()  # no cache: packed rows stay apart
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(labels.shape)


def _hand(model, batches, normalization: str) -> torch.Tensor:
    """The step's loss as each normalisation defines it, from per-token NLLs."""
    means, sequences, total, count = [], [], 0.0, 0
    for batch in batches:
        nll, target = _token_nll(model, batch), batch["labels"][:, 1:] != IGNORE_INDEX
        total, count = total + nll[target].sum(), count + int(target.sum())
        means.append(nll[target].mean())
        docs = torch.cumsum(batch["position_ids"] == 0, 1)[:, 1:] if "position_ids" in batch else None
        for row in range(nll.size(0)):
            for doc in docs[row].unique() if docs is not None else [None]:
                keep = target[row] & (docs[row] == doc if docs is not None else True)
                if keep.any():
                    sequences.append(nll[row][keep].mean())
    return {
        "tokens": total / count,
        "micro_batch_mean": torch.stack(means).mean(),
        "sequence_mean": torch.stack(sequences).mean(),
    }[normalization]


def _packed(examples) -> dict[str, torch.Tensor]:
    """Two documents per row, position_ids restarting at each: a packed micro-batch."""
    ids, labels, pos = [], [], []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]
        pos += list(range(len(ex.input_ids)))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
    }


@pytest.mark.parametrize("head", ["full", "target"])
@pytest.mark.parametrize("normalization", ["tokens", "micro_batch_mean", "sequence_mean"])
def test_each_loss_normalization_is_its_hand_computation(normalization, head):
    """The step's loss and gradient (sum of the micro-batches' loss sums / the summed normaliser, as the
    loop divides them) equal the hand-computed tokens / micro-batch-mean / sequence-mean loss, padded and
    packed, through the full-logits and the target-only loss paths."""
    from sftlab.model.loss import TargetLossHead, full_nll
    from sftlab.trainer.objective import SFTObjective

    examples = _examples(64)
    for batches in (
        [pad_collate(examples[:4], 2), pad_collate(examples[4:], 2)],
        [_packed(examples[:3]), _packed(examples[3:])],
    ):
        model = build_model(vocab_size=64, seed=3)
        loss_fn = (
            full_nll if head == "full" else TargetLossHead.for_model(model, chunk_tokens=5)
        )  # chunks cut rows
        objective = SFTObjective(loss_fn, normalization)
        norm = sum(objective.normaliser(b) for b in batches)
        step = sum(objective.loss_sum(model, b) for b in batches) / norm
        step.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        want = _hand(model, batches, normalization)
        want.backward()
        assert step.item() == pytest.approx(want.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)
    if normalization != "tokens":  # the three differ on these examples
        assert _hand(model, batches, normalization).item() != pytest.approx(
            _hand(model, batches, "tokens").item(), rel=1e-3
        )
    assert objective.evaluation().normalization == "tokens"


def test_sequence_mean_refuses_a_loss_function_that_ignores_weights():
    from sftlab.errors import SftlabError
    from sftlab.trainer.objective import SFTObjective

    model = build_model(vocab_size=64, seed=3)
    objective = SFTObjective(lambda m, b: torch.zeros(()), "sequence_mean")
    with pytest.raises(SftlabError, match="sequence_mean needs a loss function that honours"):
        objective.loss_sum(model, pad_collate(_examples(64, 2), 2))
