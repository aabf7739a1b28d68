"""Gradient accumulation: the step's loss is normalised over ALL target tokens of the step."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import build_model

from sftlab.data.collate import pad_collate
from sftlab.data.types import IGNORE_INDEX, TokenizedExample
from sftlab.model.loss import summed_nll
from sftlab.trainer.distributed import Engine
from sftlab.trainer.loop import step_normaliser, train_step
from sftlab.trainer.objective import SFTObjective


def one_step(model, batches, accelerator, loss_fn=None) -> tuple[float, int]:
    """The loop's step: (loss sum over all ranks, the step's normaliser), the gradients left on the model."""
    objective = SFTObjective(loss_fn)
    targets = step_normaliser(objective, batches, accelerator)
    return train_step(model, objective, Engine.of(accelerator), batches, targets), targets


def make_examples(vocab: int, n: int = 8) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 6 + 5 * i  # unequal lengths ...
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        n_target = 1 + (i * 7) % (length - 2)  # ... and unequal target counts
        labels = [IGNORE_INDEX] * (length - n_target) + ids[length - n_target :]
        out.append(TokenizedExample(ids, labels))
    return out


def grads_after_step(examples, micro: int) -> tuple[dict[str, torch.Tensor], float]:
    model = build_model(vocab_size=64, seed=3)
    acc = Accelerator(cpu=True)
    batches = [pad_collate(examples[i : i + micro], pad_id=2) for i in range(0, len(examples), micro)]
    nll, targets = one_step(model, batches, acc)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, nll / targets


@pytest.mark.parametrize("micro", [4, 1])
def test_same_gradient_for_any_micro_batching(micro):
    examples = make_examples(64)
    ref, ref_loss = grads_after_step(examples, 8)
    got, loss = grads_after_step(examples, micro)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref.items():
        rel = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel <= 1e-5, (
            f"{name}: relative gradient difference {rel:.2e} for {micro}-example micro-batches"
        )


def test_reference_is_global_token_mean_not_mean_of_means():
    """The 1x8 gradient is d/dw [sum of all token NLLs / all target tokens]; a mean of micro-batch means differs."""
    examples = make_examples(64)
    ref, _ = grads_after_step(examples, 8)

    model = build_model(vocab_size=64, seed=3)
    batch = pad_collate(examples, pad_id=2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (summed_nll(logits, batch["labels"]) / n).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-7)

    # mean of per-micro-batch means (the common mistake) gives a measurably different gradient
    model.zero_grad()
    for i in range(0, 8, 4):
        b = pad_collate(examples[i : i + 4], pad_id=2)
        lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        k = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        (summed_nll(lg, b["labels"]) / k / 2).backward()
    diff = max(((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in model.named_parameters())
    assert diff > 1e-3


def test_summed_nll_matches_transformers_loss(tiny_model):
    """Our summed NLL / count equals the model's own (shifted, mean) causal-LM loss."""
    examples = make_examples(len(tiny_model.get_input_embeddings().weight), n=3)
    b = pad_collate(examples, pad_id=2)
    out = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(summed_nll(out.logits, b["labels"]) / n, out.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [60, 100, 1000])
def test_token_budget_micro_batches_give_the_same_gradient(budget):
    """Token-budget micro-batches (length-grouped, padding included in the budget), with the
    target-only loss head, give the gradient of one batch of all the examples."""
    from sftlab.data.collate import token_budget_batches
    from sftlab.model.loss import TargetLossHead

    examples = make_examples(64)
    ref, ref_loss = grads_after_step(examples, 8)
    lengths = [len(e.input_ids) for e in examples]
    groups = token_budget_batches(list(range(len(examples))), lengths, budget, window=4)
    assert sorted(i for g in groups for i in g) == list(range(len(examples)))
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in groups)
    model = build_model(vocab_size=64, seed=3)
    batches = [pad_collate([examples[i] for i in g], pad_id=2) for g in groups]
    nll, targets = one_step(model, batches, Accelerator(cpu=True), TargetLossHead.for_model(model, 5))
    assert nll / targets == pytest.approx(ref_loss, rel=1e-6)
    for name, p in model.named_parameters():
        rel = (p.grad - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e} with a {budget}-token budget"


@pytest.mark.parametrize("head", ["full", "target"])
def test_gradient_checkpointing_gives_the_same_gradient(head):
    """Activation recomputation (non-reentrant, as the loop enables it) changes memory, not the gradient."""
    from sftlab.model.loss import TargetLossHead, full_nll

    examples = make_examples(64)
    batch = pad_collate(examples, pad_id=2)
    grads = []
    for checkpointing in (False, True):
        model = build_model(vocab_size=64, seed=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss_fn = full_nll if head == "full" else TargetLossHead.for_model(model, 16)
        loss_fn(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        rel = (grads[1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e} with gradient checkpointing"


def test_a_bf16_step_computes_its_loss_as_evaluation_does():
    """The target-only head runs after the model's forward: under the run's autocast in the training step as
    in evaluation, so a step's loss is the eval loss of the same batch (it was fp32 in training only)."""
    from sftlab.model.loss import TargetLossHead
    from sftlab.trainer.loop import evaluate_loss

    examples = make_examples(64, n=4)
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    model = build_model(vocab_size=64, seed=3)
    objective = SFTObjective(TargetLossHead.for_model(model))  # as the run: before Accelerate wraps it
    model = acc.prepare(model)
    assert objective.loss_fn.mode == "target"
    targets = step_normaliser(objective, [pad_collate(examples, pad_id=2)], acc)
    trained = train_step(model, objective, Engine.of(acc), [pad_collate(examples, pad_id=2)], targets)
    evaluated = evaluate_loss(model, examples, len(examples), 2, acc, objective)["eval_loss"]
    assert trained / targets == pytest.approx(evaluated, rel=1e-6)
