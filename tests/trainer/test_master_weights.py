"""fp32 master weights: bf16 training learns like fp32, resumes bitwise, and frozen weights are never rounded."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import build_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import get_scheduler

from sftlab.trainer.master_weights import (
    MasterWeightAdamW,
    load_master_weights,
    master_weight_optimizer,
    needs_master_weights,
    release_file_pages,
    seed_master_weights,
    use_bf16_weights,
)

VOCAB = 256
LR = 2e-5


def decay_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """build_optimizer's grouping: no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def token_batches(n: int, seed: int = 1, rows: int = 4, length: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, length), generator=g) for _ in range(n)]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def bf16_exact_model(seed: int = 0):
    """A tiny fp32 Llama whose weights are exactly representable in bf16: every mode starts from the same point."""
    model = build_model(VOCAB, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


@functools.cache
def train_update(mode: str, steps: int = 5, accum: int = 1) -> torch.Tensor:
    """Weights after - before `steps` AdamW steps at lr 2e-5 on fixed batches (masters for bf16_master).

    Each step sees 4 rows, split into `accum` micro-batches whose gradients accumulate in `.grad`.
    """
    model = bf16_exact_model()
    if mode in ("bf16_master", "bf16_plain"):
        model = model.to(torch.bfloat16)
    if mode == "bf16_master":
        opt = MasterWeightAdamW(decay_groups(model), lr=LR)
        weights = lambda: [opt.master_of(p) for p in model.parameters()]  # noqa: E731
    else:
        opt = torch.optim.AdamW(decay_groups(model), lr=LR)
        weights = lambda: list(model.parameters())  # noqa: E731
    before = flat(weights()).clone()
    batches = token_batches(steps * accum, rows=4 // accum)
    for step in range(steps):
        for k in range(accum):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                loss = lm_loss(model, batches[step * accum + k]) / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return flat(weights()) - before


def agreement(update: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    return F.cosine_similarity(update, reference, dim=0).item(), (update.norm() / reference.norm()).item()


# ---------------------------------------------------------------------------- the acceptance criterion


@pytest.mark.parametrize("accum", [1, 4])
def test_bf16_training_updates_match_fp32(accum):
    """Autocast bf16 (fp32 weights) and pure bf16 weights + MasterWeightAdamW move the weights like fp32 does."""
    reference = train_update("fp32", accum=accum)
    for mode in ("autocast", "bf16_master"):
        cos, ratio = agreement(train_update(mode, accum=accum), reference)
        assert cos >= 0.95, (mode, cos)
        assert abs(ratio - 1) <= 0.10, (mode, ratio)


def test_plain_adamw_on_bf16_weights_fails_the_criterion():
    """The bug being fixed: most lr-2e-5 updates are below half a bf16 ulp and vanish."""
    reference = train_update("fp32")
    update = train_update("bf16_plain")
    cos, ratio = agreement(update, reference)
    assert cos < 0.95 or abs(ratio - 1) > 0.10, (cos, ratio)
    assert (update == 0).float().mean() > 0.5  # most weights did not move at all
    assert (reference == 0).float().mean() < 0.01


# ---------------------------------------------------------------------------- the optimizer's mechanics


def mixed_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(),
        torch.ones(4, dtype=torch.bfloat16).requires_grad_(),
        (torch.randn(6, generator=g) * 0.02).requires_grad_(),  # an fp32 parameter: its own master
        (torch.randn(3, 3, generator=g)).to(torch.float16).requires_grad_(),
    ]


def random_grads(params, step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    if step == 1:
        grads[1] = None  # a parameter without a gradient is skipped, as by AdamW
    return grads


def with_fp32_reference(params, **adamw):
    """(MasterWeightAdamW over `params`, fp32 copies of them, plain AdamW over the copies)."""
    ref_params = [p.detach().float().clone().requires_grad_() for p in params]
    return MasterWeightAdamW(params, **adamw), ref_params, torch.optim.AdamW(ref_params, **adamw)


def test_step_is_fp32_adamw_on_the_masters_bitwise():
    params = mixed_params()
    groups = [
        {"params": [params[0], params[2]], "weight_decay": 0.1},
        {"params": [params[1], params[3]], "lr": 1e-3},
    ]
    opt = MasterWeightAdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ref_params = [p.detach().float().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(
        [
            {"params": [ref_params[0], ref_params[2]], "weight_decay": 0.1},
            {"params": [ref_params[1], ref_params[3]], "lr": 1e-3},
        ],
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
    )
    # Same structure and hyperparameters; masters are fp32 copies, fp32 params are their own masters.
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert [g["lr"] for g in opt.param_groups] == [LR, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.master_of(params[2]) is params[2]
    assert all(opt.master_of(p).dtype == torch.float32 for p in params)
    assert opt.master_of(params[0]) is not params[0]

    for step in range(4):
        for p, rp, g in zip(params, ref_params, random_grads(params, step)):
            p.grad = g
            rp.grad = None if g is None else g.float().clone()
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for p, rp in zip(params, ref_params):
            m = opt.master_of(p)
            assert torch.equal(m, rp), "masters follow fp32 AdamW exactly"
            assert torch.equal(p.detach(), m.to(p.dtype)), "model params are the masters rounded to nearest"
            assert p.grad is None and m.grad is None
    # The norm weight (1.0, lr 1e-3): its master moved, by less than half a bf16 ulp (2**-8) at 1.0.
    m1 = opt.master_of(params[1])
    assert not torch.equal(m1, torch.ones(4)) and ((m1 - 1).abs() < 2**-8).all()


def test_clip_grad_norm_clips_the_fp32_master_grads():
    params = mixed_params()
    opt, ref_params, ref = with_fp32_reference(params, lr=1e-3, weight_decay=0.0)
    for p, rp, g in zip(params, ref_params, random_grads(params, 0)):
        p.grad, rp.grad = g, g.float().clone()
    norm = opt.clip_grad_norm_(0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    assert norm.dtype == torch.float32 and torch.equal(norm, ref_norm) and norm > 0.5
    assert all(p.grad is None for p in params if p.dtype != torch.float32), "grads moved to the masters"
    for p, rp in zip(params, ref_params):
        assert torch.equal(opt.master_of(p).grad, rp.grad)
    opt.step()
    ref.step()
    for p, rp in zip(params, ref_params):
        assert torch.equal(opt.master_of(p), rp)


def test_clipping_the_model_grads_before_step_is_also_valid():
    """accelerator.clip_grad_norm_(model.parameters()) clips the bf16 grads in place; step uses them."""
    params = mixed_params()
    opt, ref_params, ref = with_fp32_reference(params, lr=1e-3, weight_decay=0.0)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for p, rp in zip(params, ref_params):
        rp.grad = p.grad.float().clone()
    opt.step()
    ref.step()
    for p, rp in zip(params, ref_params):
        assert torch.equal(opt.master_of(p), rp)


def test_skipped_step_and_zero_grad_leave_no_gradients():
    """The loop's non-finite path: clip, no step, zero_grad; the next step sees only the new gradients."""
    params = mixed_params()
    opt = MasterWeightAdamW(params, lr=1e-3)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.clip_grad_norm_(1.0)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None and opt.master_of(p).grad is None for p in params)
    before = [opt.master_of(p).clone() for p in params]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(opt.master_of(p), b) for p, b in zip(params, before))
    # zero_grad(set_to_none=False): buffers are zeroed and reused, not accumulated into
    for p, g in zip(params, random_grads(params, 2)):
        p.grad = g
    opt.clip_grad_norm_(float("inf"))
    opt.zero_grad(set_to_none=False)
    grads = random_grads(params, 3)
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad.add_(g)
    opt.clip_grad_norm_(float("inf"))
    for p, g in zip(params, grads):
        assert torch.equal(opt.master_of(p).grad, g.float())
    # a backward after the grads were moved (and before zero_grad) adds to them, as .grad accumulation does
    more = random_grads(params, 4)
    for p, g in zip(params, more):
        if p.dtype != torch.float32:
            p.grad = g
    opt.clip_grad_norm_(float("inf"))
    for p, g, h in zip(params, grads, more):
        if p.dtype != torch.float32:
            assert torch.equal(opt.master_of(p).grad, g.float() + h.float())


def test_lr_scheduler_sets_the_lr_the_masters_are_updated_with():
    params = mixed_params()
    opt, ref_params, ref = with_fp32_reference(params, lr=1e-3, weight_decay=0.0)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=6)
    ref_sched = get_scheduler("linear", ref, num_warmup_steps=2, num_training_steps=6)
    lrs = []
    for step in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        before = [opt.master_of(p).clone() for p in params]
        for p, rp, g in zip(params, ref_params, random_grads(params, 0)):
            p.grad, rp.grad = g, g.float().clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        opt.zero_grad()
        ref.zero_grad()
        moved = any(not torch.equal(opt.master_of(p), b) for p, b in zip(params, before))
        assert moved == (lrs[-1] > 0)
        assert all(torch.equal(opt.master_of(p), rp) for p, rp in zip(params, ref_params))
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_rejects_duplicates_and_non_float_params():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        MasterWeightAdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="floating point"):
        MasterWeightAdamW([torch.zeros(3, dtype=torch.int64)])


def test_needs_master_weights():
    model = build_model(VOCAB)
    assert not needs_master_weights(model)
    assert needs_master_weights(model.to(torch.bfloat16))


# ---------------------------------------------------------------------------- checkpoints: bitwise resume


def run_steps(model, opt, sched, batches) -> None:
    for ids in batches:
        lm_loss(model, ids).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def fresh_run(seed: int):
    model = bf16_exact_model(seed).to(torch.bfloat16)
    opt = MasterWeightAdamW(decay_groups(model), lr=1e-3, betas=(0.9, 0.95))
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=6)
    return model, opt, sched


def assert_same_run(a, b) -> None:
    (ma, oa, _), (mb, ob, _) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(oa.master_of(pa), ob.master_of(pb))
        sa, sb = oa.state[oa.master_of(pa)], ob.state[ob.master_of(pb)]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_roundtrip_resumes_bitwise(tmp_path):
    batches = token_batches(6, seed=3)
    straight = fresh_run(0)
    run_steps(*straight, batches)

    first = fresh_run(0)
    run_steps(*first, batches[:3])
    model, opt, sched = first
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")

    resumed = fresh_run(seed=7)  # different weights: everything must come from the files
    model, opt, sched = resumed
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert len(saved["master_weights"]) == len(list(model.parameters()))
    assert all(t.dtype == torch.float32 for t in saved["master_weights"].values())
    opt.load_state_dict(saved)
    sched.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    # decay_groups orders the flat state-dict indices: decay params first, then no-decay ones
    flat_params = [p for g in decay_groups(model) for p in g["params"]]
    assert all(torch.equal(opt.master_of(p), saved["master_weights"][i]) for i, p in enumerate(flat_params))
    run_steps(*resumed, batches[3:])
    assert_same_run(straight, resumed)


def test_masters_are_not_just_the_rounded_model_weights(tmp_path):
    """Resuming from the bf16 model weights alone (plain AdamW state) would lose the masters' low bits."""
    model, opt, sched = fresh_run(0)
    run_steps(model, opt, sched, token_batches(2, seed=3))
    sd = opt.state_dict()
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in sd["master_weights"].values())
    plain = {k: v for k, v in sd.items() if k != "master_weights"}
    model2, opt2, _ = fresh_run(0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(plain)  # no masters saved: taken from the model weights
    for p in model2.parameters():
        assert torch.equal(opt2.master_of(p), p.float())
    bad = dict(sd, master_weights={0: sd["master_weights"][0]})
    with pytest.raises(ValueError, match="master weights do not match"):
        opt2.load_state_dict(bad)


def test_accelerate_prepare_clip_save_and_load_state(tmp_path):
    """The loop's path: prepare, clip through Accelerate's wrapper, save_state / load_state(weights_only)."""
    batches = token_batches(4, seed=5)

    def make(seed):
        acc = Accelerator(cpu=True)
        model, opt, sched = fresh_run(seed)
        model, opt = acc.prepare(model, opt)
        return acc, model, opt, sched

    def steps(acc, model, opt, sched, bs):
        norms = []
        for ids in bs:
            acc.backward(lm_loss(model, ids))
            norms.append(float(master_weight_optimizer(opt).clip_grad_norm_(1.0)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return norms

    acc, model, opt, sched = make(0)
    assert isinstance(master_weight_optimizer(opt), MasterWeightAdamW) and not isinstance(
        opt, MasterWeightAdamW
    )
    assert master_weight_optimizer(torch.optim.AdamW([torch.zeros(1, requires_grad=True)])) is None
    norms = steps(acc, model, opt, sched, batches[:2])
    assert all(n > 0 for n in norms)
    acc.save_state(tmp_path / "ckpt", safe_serialization=True)
    sched_state = sched.state_dict()
    steps(acc, model, opt, sched, batches[2:])

    acc2, model2, opt2, sched2 = make(9)
    acc2.load_state(tmp_path / "ckpt", load_kwargs={"weights_only": True})
    sched2.load_state_dict(sched_state)
    steps(acc2, model2, opt2, sched2, batches[2:])
    assert_same_run(
        (model, master_weight_optimizer(opt), None), (model2, master_weight_optimizer(opt2), None)
    )


def _one_master_step(model, originals) -> MasterWeightAdamW:
    """One bf16-autocast step of `model`'s trainable parameters through fp32 masters seeded from `originals`."""
    opt = MasterWeightAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seed_master_weights(opt, originals)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    return opt


def test_frozen_weights_are_never_rounded_to_bf16():
    """bf16 compute copies: trainable matmul weights become bf16 (their fp32 values seed the masters); a
    frozen weight becomes bf16 only where bf16 holds it exactly, so the saved model gives it back bitwise."""
    model = build_model(VOCAB, seed=3)
    layer = model.model.layers[0]
    exact = layer.self_attn.q_proj.weight
    with torch.no_grad():
        exact.copy_(exact.to(torch.bfloat16).float())  # as loaded from a bf16 checkpoint
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0." in n}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    originals = use_bf16_weights(model, matmul_only=True)
    assert exact.dtype == torch.bfloat16 and layer.self_attn.k_proj.weight.dtype == torch.float32
    assert id(exact) not in {id(p) for p, _ in originals}  # frozen: no master to seed, no fp32 copy kept
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16  # trainable
    assert {id(p) for p, _ in originals} >= {
        id(p)
        for p in model.parameters()
        if p.requires_grad and p.ndim == 2 and p is not model.get_input_embeddings().weight
    }
    opt = _one_master_step(model, originals)
    load_master_weights(model, opt)
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 and torch.equal(params[n], v) for n, v in frozen.items())


def test_frozen_weights_rounded_to_bf16_compute_what_autocast_computes():
    """`round_frozen` (a LoRA run, whose base is never saved from memory): frozen matmul weights become their
    bf16 rounding (no fp32 copy kept), and the loss and the trainable weights' gradients under bf16 autocast
    are bitwise those of the fp32 frozen weights (autocast rounds them per op to the same values)."""

    def run(round_frozen: bool):
        model = build_model(VOCAB, seed=5)
        for name, p in model.named_parameters():
            p.requires_grad_("layers.1." in name)
        use_bf16_weights(model, matmul_only=True, round_frozen=round_frozen)
        x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        frozen = model.model.layers[0].mlp.down_proj.weight
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return frozen.dtype, loss.detach(), grads

    kept, rounded = run(False), run(True)
    assert kept[0] == torch.float32 and rounded[0] == torch.bfloat16
    assert torch.equal(kept[1], rounded[1])
    assert kept[2].keys() == rounded[2].keys() and all(
        torch.equal(kept[2][n], rounded[2][n]) for n in kept[2]
    )


@pytest.mark.parametrize("frozen_layer", [False, True])
def test_the_weights_left_fp32_leave_the_checkpoint_file(frozen_layer):
    """After the casts, the parameters left fp32 (embeddings, norms) hold memory of their own, the same values:
    none keeps the checkpoint's memory map (and the pages the casts read) alive. While a frozen matmul weight
    stays fp32 (it keeps the map anyway), nothing is copied."""
    model = build_model(VOCAB, seed=4)
    if frozen_layer:
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # not exact in bf16: stays fp32
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    use_bf16_weights(model, matmul_only=True)
    left = {n: p for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert "model.embed_tokens.weight" in left and "model.norm.weight" in left
    assert all(torch.equal(p, before[n][1]) for n, p in left.items())
    assert all((p.data_ptr() == before[n][0]) is frozen_layer for n, p in left.items())


def test_a_lora_runs_adapter_gets_its_masters_and_its_frozen_base_stays_bf16():
    """`frozen_too=False` (saving a LoRA adapter): the optimized parameters hold their exact fp32 masters, the
    frozen base keeps its bf16 weights (no fp32 copy of the base at the end of the run)."""
    model = build_model(VOCAB, seed=6)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1.mlp" in name)
    originals = use_bf16_weights(model, matmul_only=True, round_frozen=True)
    opt = _one_master_step(model, originals)
    base = model.model.layers[0].self_attn.q_proj.weight
    base_before = base.detach().clone()
    load_master_weights(model, opt, frozen_too=False)
    trained = model.model.layers[1].mlp.up_proj.weight
    assert trained.dtype == torch.float32 and torch.equal(trained, opt.master_of(trained))
    assert base.dtype == torch.bfloat16 and torch.equal(base, base_before)


def _mapping_rss_kb(address: int) -> int:
    """Resident kB of the mapping holding `address` (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                return next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
    raise AssertionError("no mapping")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise pages out on Linux only")
def test_a_weight_read_from_a_mapped_file_hands_its_pages_back_and_keeps_its_values(tmp_path):
    """The casts read every page of an fp32 checkpoint that transformers maps rather than copies; once a weight
    is cast, its pages leave the process's resident memory, and the weight reads the same values after."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(1024, 1024)}, path)
    with safe_open(path, framework="pt") as f:
        mapped = f.get_tensor("w")
    expect = mapped.clone()
    anon = torch.randn(512, 512)
    anon_expect = anon.clone()
    assert float(mapped.sum()) == float(expect.sum())  # every page read: resident
    before = _mapping_rss_kb(mapped.data_ptr())
    release_file_pages(mapped)
    release_file_pages(anon)  # not a file's map: left alone
    after = _mapping_rss_kb(mapped.data_ptr())
    assert before >= 4000 and after <= before - 3900, (before, after)  # 4 MiB of fp32 weights
    assert torch.equal(mapped, expect) and torch.equal(anon, anon_expect)
