"""TargetLossHead: the same summed NLL and gradients as the full-logits path, on tiny random models."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
)

from sftlab.data.types import IGNORE_INDEX
from sftlab.model.loss import TargetLossHead, count_targets, full_nll, model_forward

V, H = 300, 32
COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama-untied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=8),
    "gemma2-softcap": lambda: Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0),
    "gemma3-softcap": lambda: Gemma3TextConfig(**COMMON, head_dim=8, final_logit_softcapping=3.0),
    "cohere": lambda: CohereConfig(**COMMON, logit_scale=0.5),
    "granite": lambda: GraniteConfig(**COMMON, logits_scaling=4.0),
}


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).float()


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """3 rows, right padding; -100 on each prompt and on the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts, t = [10, 7, 4], [3, 2, 1], 10
    ids = torch.zeros(3, t, dtype=torch.long)
    labels = torch.full((3, t), IGNORE_INDEX)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        labels[i, p:n] = ids[i, p:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batch(seed: int = 2) -> dict[str, torch.Tensor]:
    """One row of 3 documents, position_ids restarting per document, no attention mask."""
    g = torch.Generator().manual_seed(seed)
    docs = [(6, 2), (9, 4), (5, 1)]  # (length, prompt length); a document's first label is never a target
    ids = torch.randint(3, V, (sum(n for n, _ in docs),), generator=g)
    labels, pos = [], []
    for n, p in docs:
        labels += [IGNORE_INDEX] * p + list(range(n - p))
        pos += list(range(n))
    labels = torch.tensor(labels)
    labels[labels >= 0] = ids[labels >= 0]
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": torch.tensor(pos)[None]}


BATCHES = {"padded": padded_batch, "packed": packed_batch}


def loss_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {
        k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None
    }


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a.float() - b.float()).abs().max() <= rel * scale, (a, b)


@pytest.mark.parametrize("batch_kind", BATCHES)
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_grads_match_full_path(name, batch_kind):
    model = make_model(name)
    batch = BATCHES[batch_kind]()
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    assert head.mode == "target", head.reason
    assert count_targets(batch["labels"]) > 3  # several chunks
    ref_loss, ref_grads = loss_and_grads(full_nll, model, batch)
    loss, grads = loss_and_grads(head, model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel_close(loss, ref_loss, 1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], 1e-5)


def test_softcap_and_scale_are_applied():
    """The tiny models' logits are large enough that the post-processing matters."""
    for name, attr, value in [
        ("gemma2-softcap", "final_logit_softcapping", None),
        ("cohere", "logit_scale", 1.0),
    ]:
        model = make_model(name)
        batch = padded_batch()
        head = TargetLossHead.for_model(model, chunk_tokens=3)
        target = model.config if attr != "logit_scale" else model
        with torch.no_grad():
            ref = full_nll(model, batch)
            setattr(target, attr, value)
            plain = full_nll(model, batch)
        assert (ref - plain).abs() > 1e-2 * ref.abs()
        setattr(target, attr, getattr(CONFIGS[name](), attr))
        with torch.no_grad():
            assert_rel_close(head(model, batch), ref, 1e-5)


def test_output_projection_with_bias():
    model = make_model("llama-untied")
    lm_head = nn.Linear(H, V, bias=True)
    with torch.no_grad():
        lm_head.weight.copy_(model.lm_head.weight)
        lm_head.bias.normal_(0, 1.0)
    model.set_output_embeddings(lm_head)
    batch = packed_batch()
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    assert head.mode == "target", head.reason
    ref_loss, ref_grads = loss_and_grads(full_nll, model, batch)
    loss, grads = loss_and_grads(head, model, batch)
    assert_rel_close(loss, ref_loss, 1e-5)
    assert "lm_head.bias" in grads
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], 1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunk_sizes_and_no_grad(chunk):
    model = make_model("llama-untied")
    batch = padded_batch()
    head = TargetLossHead.for_model(model, chunk_tokens=chunk)
    with torch.no_grad():
        ref, loss = full_nll(model, batch), head(model, batch)
    assert not loss.requires_grad
    assert_rel_close(loss, ref, 1e-5)


def test_no_targets_returns_connected_zero():
    model = make_model("llama-untied")
    batch = padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    loss, grads = loss_and_grads(head, model, batch)
    assert loss.item() == 0.0
    assert len(grads) == len(list(model.parameters()))  # every parameter is in the graph (DDP)
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_through_ddp(tmp_path):
    """The forward goes through the wrapper (DDP's gradient sync depends on it)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = make_model("llama-tied")
        batch = packed_batch()
        head = TargetLossHead.for_model(model, chunk_tokens=3)
        ref_loss, ref_grads = loss_and_grads(full_nll, model, batch)
        loss, grads = loss_and_grads(head, DistributedDataParallel(model), batch)
    finally:
        dist.destroy_process_group()
    assert_rel_close(loss, ref_loss, 1e-5)
    assert grads.keys() == {"module." + k for k in ref_grads}
    for k in ref_grads:
        assert_rel_close(grads["module." + k], ref_grads[k], 1e-5)


def assert_close_to_full(loss, ref_loss, grads, ref_grads, grad_dtype):
    """Low-precision agreement: loss within 2e-2, finite grads in `grad_dtype`, cosine > 0.98 per parameter."""
    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, 2e-2)
    for k, g in grads.items():
        assert g.dtype == grad_dtype and torch.isfinite(g).all()
        assert torch.cosine_similarity(g.float().flatten(), ref_grads[k].float().flatten(), dim=0) > 0.98, k


@pytest.mark.parametrize("batch_kind", BATCHES)
def test_bf16_autocast_close_to_full(batch_kind):
    model = make_model("gemma2-softcap")
    batch = BATCHES[batch_kind]()
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(full_nll, model, batch)
        loss, grads = loss_and_grads(head, model, batch)
    assert_close_to_full(loss, ref_loss, grads, ref_grads, torch.float32)


@pytest.mark.parametrize("name", ["llama-tied", "qwen2"])
def test_bf16_model_close_to_full(name):
    model = make_model(name).to(torch.bfloat16)
    batch = padded_batch()
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    assert head.mode == "target", head.reason
    ref_loss, ref_grads = loss_and_grads(full_nll, model, batch)
    loss, grads = loss_and_grads(head, model, batch)
    assert_close_to_full(loss, ref_loss, grads, ref_grads, torch.bfloat16)


def test_head_leaves_the_model_unchanged():
    model = make_model("gemma2-softcap")
    batch = padded_batch()
    keys, training = list(model.state_dict()), model.training
    with torch.no_grad():
        before = model_forward(model, batch).logits
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    head(model, batch).backward()
    bad = dict(batch, input_ids=batch["input_ids"] + 10 * V)  # the forward raises inside the head
    with pytest.raises(Exception):
        head(model, bad)
    lm_head = model.get_output_embeddings()
    assert "forward" not in vars(lm_head) and model.config.final_logit_softcapping == 3.0
    assert list(model.state_dict()) == keys and model.training == training
    with torch.no_grad():
        after = model_forward(model, batch).logits
    assert after.shape == (3, 10, V) and torch.equal(before, after)


def test_self_check_restores_training_modes():
    model = make_model("llama-tied")
    model.train()
    model.model.layers[0].eval()
    TargetLossHead.for_model(model)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training


def test_unsupported_output_projection_falls_back(caplog):
    class OddHead(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight.t()

    model = make_model("llama-untied")
    model.set_output_embeddings(OddHead(model.lm_head.weight))
    batch = padded_batch()
    with caplog.at_level(logging.INFO, logger="sftlab.model.loss"):
        head = TargetLossHead.for_model(model)
    assert head.mode == "full" and "OddHead" in head.reason and "OddHead" in caplog.text
    with torch.no_grad():
        assert torch.equal(head(model, batch), full_nll(model, batch))


def test_unknown_logit_postprocessing_fails_self_check(caplog):
    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = torch.tanh(out.logits)  # not linear: does not commute with the projection
            return out

    torch.manual_seed(0)
    model = Scaled(LlamaConfig(**COMMON))
    with caplog.at_level(logging.INFO, logger="sftlab.model.loss"):
        head = TargetLossHead.for_model(model)
    assert head.mode == "full" and "self-check mismatch" in head.reason and "self-check" in caplog.text
    batch = padded_batch()
    with torch.no_grad():
        assert torch.equal(head(model, batch), full_nll(model, batch))


class _VocabTensorShapes(TorchDispatchMode):
    """Records the largest row count of any [*, V] tensor an op creates (weight-sized ones aside)."""

    def __init__(self):
        super().__init__()
        self.max_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.numel() != V * H:
                self.max_rows = max(self.max_rows, t.numel() // V)
        return out


def test_no_logits_beyond_one_chunk():
    model = make_model("llama-untied")
    batch = packed_batch()
    head = TargetLossHead.for_model(model, chunk_tokens=3)
    with _VocabTensorShapes() as rec:
        head(model, batch).backward()
    assert rec.max_rows == 3
    with _VocabTensorShapes() as rec_full:  # the detector sees the full path's [T, V] logits
        full_nll(model, batch).backward()
    assert rec_full.max_rows >= batch["input_ids"].numel()


def test_a_frozen_head_runs_in_smaller_chunks(monkeypatch):
    """Without a weight gradient to sum per chunk (a frozen head, evaluation), the head runs in chunks of at
    most FROZEN_HEAD_CHUNK rows (less transient memory), as few as cover the rows and of equal size; with one,
    in the configured chunks. Same loss."""
    from sftlab.model import loss as loss_mod

    calls = []
    real = loss_mod._logits

    def counting(hc, w, b, buffer):
        calls.append(hc.shape[0])
        return real(hc, w, b, buffer)

    monkeypatch.setattr(loss_mod, "_logits", counting)
    torch.manual_seed(0)
    h, w, y = torch.randn(600, 16, requires_grad=True), torch.randn(50, 16), torch.randint(0, 50, (600,))
    totals = {}
    for trains in (False, True):
        calls.clear()
        weight = w.clone().requires_grad_(trains)
        totals[trains] = loss_mod._ChunkedLinearCE.apply(
            h, weight, None, y, torch.float32, 1.0, None, 1024, True, None
        )
        assert calls == ([600] if trains else [300, 300])  # FROZEN_HEAD_CHUNK 320: two chunks, not 320 + 280
    torch.testing.assert_close(totals[False], totals[True])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_cross_entropy_is_the_float32_one(dtype):
    """`_plain_ce` (the head's path without scale, softcap or row weights): each row's loss is the float32
    cross-entropy of the logits, and the gradient softmax - onehot computed in float32 and rounded once to
    the logits' dtype (within one rounding step: the fused softmax kernel sums in another order)."""
    from sftlab.model import loss as loss_mod

    torch.manual_seed(0)
    rows, vocab = 21, 3001  # more rows than one log-sum-exp block, and not a multiple of it
    z = (torch.randn(rows, vocab) * 4).to(dtype)
    y = torch.randint(0, vocab, (rows,))
    expected_nll = F.cross_entropy(z.float(), y, reduction="none")
    expected_grad = torch.softmax(z.float(), dim=-1) - F.one_hot(y, vocab).float()
    nll, none = loss_mod._plain_ce(z.clone(), y, want_grad=False)
    assert none is None
    torch.testing.assert_close(nll, expected_nll, rtol=1e-6, atol=1e-5)
    nll, grad = loss_mod._plain_ce(z.clone(), y, want_grad=True)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-6, atol=1e-5)
    assert grad.dtype == dtype
    ulp = expected_grad.abs() * (2**-7 if dtype == torch.bfloat16 else 2**-22) + 1e-30
    assert ((grad.float() - expected_grad).abs() <= ulp).all()
    assert torch.equal(grad[torch.arange(rows), y], expected_grad[torch.arange(rows), y].to(dtype))


@pytest.mark.parametrize(
    "rows, chunk, sizes",
    [(517, 256, [173, 173, 171]), (517, 320, [259, 258]), (1023, 320, [256, 256, 256, 255]), (5, 320, [5])],
)
def test_chunks_are_as_few_as_cover_the_rows_and_of_equal_size(rows, chunk, sizes):
    from sftlab.model import loss as loss_mod

    pieces = loss_mod._chunks(rows, chunk)
    assert [e - s for s, e in pieces] == sizes
    assert (
        pieces[0][0] == 0 and pieces[-1][1] == rows and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    )


def test_a_frozen_weight_is_cast_once_and_again_only_when_it_changes():
    from sftlab.model import loss as loss_mod

    frozen, trained = torch.randn(50, 16), torch.randn(50, 16, requires_grad=True)
    first = loss_mod._frozen_head(frozen, torch.bfloat16)["cast"]
    assert loss_mod._frozen_head(frozen, torch.bfloat16)["cast"] is first and torch.equal(
        first, frozen.bfloat16()
    )
    frozen.mul_(2)  # an in-place change (a new version) is seen
    again = loss_mod._frozen_head(frozen, torch.bfloat16)["cast"]
    assert again is not first and torch.equal(again, frozen.bfloat16())
    assert loss_mod._frozen_head(trained, torch.bfloat16) is None
    assert loss_mod._frozen_head(frozen, torch.float32)["cast"] is None  # no copy in its own dtype
    del frozen, first, again  # the copy goes with its weight
    assert loss_mod._FROZEN["cast"] is None


def test_a_frozen_heads_logits_reuse_one_buffer_and_give_the_same_loss_and_gradient():
    """Chunks of a frozen head write their logits into one buffer of `chunk` rows, kept from call to call (one
    allocation size, whatever the number of targets): the same loss and input gradient as fresh logits."""
    from sftlab.model import loss as loss_mod

    g = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 16, generator=g)
    results, buffers = [], []
    for rows in (23, 9, 23):
        h, y = (
            torch.randn(rows, 16, generator=g, requires_grad=True),
            torch.randint(0, 300, (rows,), generator=g),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total = loss_mod._ChunkedLinearCE.apply(
                h, weight, None, y, torch.bfloat16, 1.0, None, 8, True, None
            )
        total.backward()
        buffers.append(loss_mod._FROZEN["logits"])
        reference = h.detach().clone().requires_grad_()
        logits = (reference.bfloat16() @ weight.bfloat16().t()).float()
        want = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        want.backward()
        results.append((total, h.grad, want, reference.grad))
    assert buffers[0] is buffers[1] is buffers[2] and buffers[0].shape == (8, 300)
    for total, grad, want, ref_grad in results:
        torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-3)
