"""Per-document attention on packed rows (model/attention.py): exact against each document alone, for the
forward and the gradients; padded batches and generation unchanged; nothing of it saved with the model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from sftlab.model import attention

DOCS = [(0, 10), (10, 22), (22, 30)]


def _packed(vocab):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (1, 30))
    pos = torch.cat([torch.arange(e - s) for s, e in DOCS])[None]
    return ids, pos


@pytest.mark.parametrize("impl", [attention.NAME, "sdpa", "eager"])
def test_a_packed_row_equals_its_documents_alone_forward_and_backward(impl):
    model = build_model(400, seed=3)
    ids, pos = _packed(400)
    alone = torch.cat([model(input_ids=ids[:, s:e], use_cache=False).logits for s, e in DOCS], 1)
    alone.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation(impl)
    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_documents_backward_per_length_equals_float64(dtype):
    """The CPU path's own backward (fp32 below FP32_BACKWARD_BELOW tokens, the input dtype above), with
    grouped-query heads, against per-document SDPA in float64: forward and all three gradients."""
    long = attention.FP32_BACKWARD_BELOW + 20
    sizes = [7, long, 13]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(sizes), 16).to(dtype) for heads in (4, 2, 2))
    grad = torch.randn(1, 4, sum(sizes), 16).to(dtype)
    cuts = [[0, 7, 7 + long, sum(sizes)]]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
            for a, b, c in zip(*(t.split(sizes, dim=2) for t in ref))
        ],
        dim=2,
    )
    want.backward(grad.double())
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    got = attention._per_document(*ours, cuts, 16**-0.5)
    got.backward(grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    for mine, theirs in zip(ours, ref):
        assert mine.grad.dtype == dtype
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)


def test_two_packed_rows_with_different_cuts_in_one_batch():
    model = build_model(400, seed=3)
    model.set_attn_implementation(attention.NAME)
    ids = torch.randint(5, 400, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 0]])
    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    for b, cuts in enumerate([[(0, 5), (5, 12)], [(0, 3), (3, 11), (11, 12)]]):
        for s, e in cuts:
            torch.testing.assert_close(
                got[b, s:e],
                model(input_ids=ids[b : b + 1, s:e], use_cache=False).logits[0],
                rtol=1e-5,
                atol=1e-5,
            )


def test_padded_batches_and_generation_are_plain_sdpa():
    model = build_model(400, seed=3)
    ids = torch.randint(5, 400, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as generation pads
    model.generation_config.pad_token_id = 2
    want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    want_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model.set_attn_implementation(attention.NAME)
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 3:], want[:, 3:]
    )
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False), want_gen
    )


def test_the_saved_model_loads_with_plain_sdpa(tmp_path):
    model = build_model(400)
    attention.use(model, "documents")
    model.save_pretrained(tmp_path)
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation in ("sdpa", "eager")


def test_choose_measures_keeps_the_mask_for_sliding_windows_and_other_kernels():
    model = build_model(400)
    mode, why = attention.choose("auto", model, "cpu")
    assert mode in ("documents", "mask") and "per-document SDPA" in why and "dense mask" in why
    assert attention.choose("documents", model, "cpu") == ("documents", "as configured")
    model.set_attn_implementation("eager")
    assert attention.choose("auto", model, "cpu")[0] == "mask"
    sliding = MistralForCausalLM(
        MistralConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=8,
        )
    )
    assert attention.choose("auto", sliding, "cpu") == ("mask", "the model has sliding-window layers")
    with pytest.raises(ValueError, match="sliding-window"):
        attention.choose("documents", sliding, "cpu")


def test_cuts_follow_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert attention.document_cuts(pos, 1, 8) == [[0, 3, 5, 6, 8]]


def _layout(*sizes):
    return torch.cat([torch.arange(n) for n in sizes])


def test_compiled_per_document_attention_is_the_eager_one_in_one_graph():
    """While compiling, per-document attention is one operator (sftlab::document_sdpa): the compiled forward and
    gradients equal the eager per-document ones (aot_eager: the captured graph without inductor's code
    generation), and four document layouts of one shape run through one graph, with no recompile."""
    from torch._dynamo.utils import counters

    model = build_model(400, seed=3)
    attention.use(model, "documents")
    ids = torch.randint(5, 400, (2, 30), generator=torch.Generator().manual_seed(1))
    layouts = [(10, 12, 8), (5, 20, 5), (30,), (1, 1, 28)]
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    for i, layout in enumerate(layouts):
        pos = torch.stack([_layout(*layout), _layout(*layouts[(i + 1) % 4])])
        results = []
        for m in (model, compiled):
            model.zero_grad()
            logits = m(input_ids=ids, position_ids=pos, use_cache=False).logits
            logits.square().sum().backward()
            results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_compiled_per_document_attention_runs_under_bf16_autocast():
    """Under autocast the operator gets query, key and value in the autocast dtype (rotary embeddings leave
    query and key float32, the value projection gives bf16), as SDPA does eagerly."""
    model = build_model(400, seed=3)
    attention.use(model, "documents")
    ids = torch.randint(5, 400, (1, 30), generator=torch.Generator().manual_seed(1))
    pos = _layout(10, 12, 8)[None]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    outs = []
    for m in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(input_ids=ids, position_ids=pos, use_cache=False).logits)
        outs[-1].float().square().sum().backward()
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["documents", "compiled documents", "flex"])
def test_documents_never_attend_across(mode):
    """Changing document A's tokens leaves document B's logits unchanged, and each equals the document alone.
    flex runs forward only here: torch 2.13 has no FlexAttention backward on a CPU."""
    model = build_model(400, seed=3).eval()
    attention.use(model, mode.split()[-1])
    forward = (
        torch.compile(model, backend="aot_eager", dynamic=False) if mode.startswith("compiled") else model
    )
    ids, pos = _packed(400)
    changed = ids.clone()
    changed[0, 10:22] = torch.randint(5, 400, (12,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, s:e], use_cache=False).logits for s, e in DOCS], 1)
        got = forward(input_ids=ids, position_ids=pos, use_cache=False).logits
        other = forward(input_ids=changed, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    for s, e in (DOCS[0], DOCS[2]):
        torch.testing.assert_close(other[:, s:e], got[:, s:e], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, 10:22], got[:, 10:22])


def test_flex_trains_on_cuda_only():
    model = build_model(400)
    with pytest.raises(ValueError, match="FlexAttention does not support backward on CPU"):
        attention.choose("flex", model, "cpu")
    assert attention.choose("flex", model, "cuda") == ("flex", "as configured")
    attention.use(model, "flex")
    assert model.config._attn_implementation == attention.FLEX_NAME
