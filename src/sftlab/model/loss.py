"""Token-level causal-LM loss, summed, so callers can normalise over a whole optimizer step.

`labels` are aligned with `input_ids` (IGNORE_INDEX = -100 where no loss); the shift happens
here: position t predicts token t + 1, so the label at t + 1 is the target of position t.
Returning the sum (not the mean) lets gradient accumulation divide by the number of target
tokens of the entire optimizer step, across micro-batches and ranks, instead of averaging
per-micro-batch means (which over-weights short micro-batches).

Two ways to get that sum from a model and a batch:

- `full_nll`: the reference. The model's own forward gives [B, T, V] logits for every position
  (prompt and padding included); `summed_nll` upcasts them to float32 and sums the cross-entropy.
- `TargetLossHead`: the same number without the [T x V] logits. It runs the model with its output
  projection shadowed by identity (so `model(...).logits` is the final hidden state, and the
  forward still goes through any DDP/accelerate wrapper), keeps only the N positions whose next
  token is a target, and applies projection + cross-entropy in chunks of rows inside one autograd
  Function that computes the gradients during the forward (softmax - onehot), so no [N x V] tensor
  exists for the whole batch nor is saved for backward. Logit post-processing the model does in its
  own forward (Cohere's logit_scale, Granite's logits_scaling, Gemma-2/3's final softcapping) is
  switched off for the call and applied here. `for_model` checks the path numerically against the
  model's own logits once and falls back to `full_nll` (with the reason logged) when it is not
  supported or does not match.

Both take an optional per-token weight (`batch["target_weights"]`, float, aligned with the labels: the
weight of the target at position t) and then return the weighted sum; trainer/objective.py uses it
for `train.loss_normalization: sequence_mean` (each target weighs 1 / its sequence's target count).
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sftlab.compat import torch as torch_compat
from sftlab.data.types import IGNORE_INDEX

log = logging.getLogger(__name__)


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_targets(batch: dict[str, torch.Tensor]) -> int:
    """The batch's target count: of its `labels` (shifted here), or of its `shift_labels`, already shifted
    (a sequence-parallel shard: trainer/sequence_parallel.py, where position t's target is shift_labels[t])."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return count_targets(batch["labels"])


def summed_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over target positions (float32 math); with `weights`
    (aligned with `labels`), each target's NLL times its weight."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[..., 1:].reshape(-1)
    if weights is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (nll * weights[..., 1:].reshape(-1).float()).sum()


NOT_MODEL_INPUTS = frozenset({"labels", "shift_labels", "target_weights"})


def model_forward(model, batch: dict[str, torch.Tensor]):
    """The one forward call: the model gets every key of the batch but the labels (padded batches carry
    attention_mask, packed ones restarting position_ids, others whatever their collate adds, e.g.
    pixel_values), with the KV cache off."""
    return model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, use_cache=False)


def full_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference path: full logits for every position, then `summed_nll` (weighted when the batch has
    `target_weights`); a sequence-parallel shard's `shift_labels` are its targets as they are."""
    logits = model_forward(model, batch).logits
    if "shift_labels" in batch:
        flat = logits.reshape(-1, logits.size(-1)).float()
        return F.cross_entropy(
            flat, batch["shift_labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return summed_nll(logits, batch["labels"], batch.get("target_weights"))


full_nll.weighs_targets = True  # honours batch["target_weights"] (trainer/objective.py checks)


# Rows per chunk when the output weight takes no gradient (a LoRA base, evaluation): a chunk's logits are the
# head's largest transient (320 x 49k vocabulary: 31 MB in bf16; the scale/softcap path adds a float32 copy),
# and without the weight gradient's pass over the vocabulary matrix per chunk, chunks of 256-352 rows run as
# fast per row as 1024 (measured on CPU; 384 and 512 rows at half that rate on a 2-core Xeon with AMX).
FROZEN_HEAD_CHUNK = 320


def _chunks(rows: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of as few chunks of at most `chunk` rows as cover `rows`, of equal size (to a row): each
    chunk reads the whole vocabulary matrix (twice with gradients), so a last chunk of a few rows would cost
    as much as a full one (517 targets: 2 x 259 rows, not 256 + 256 + 5)."""
    pieces = max(1, -(-rows // chunk))
    size = max(1, -(-rows // pieces))
    return [(s, min(s + size, rows)) for s in range(0, rows, size)]


# A frozen output weight (a LoRA run's head, tied to the input embedding) cannot change, so its compute-dtype
# copy is made once, not per step (SmolLM2's 49152 x 576: a 9.5 ms copy and 57 MB made each step), and its
# chunks' logits go into one buffer of `chunk` rows kept with it: a logits tensor of the chunk's own rows, a
# size that changes every step, added 13-34 MB of resident memory at the head in each later step (a larger
# request than the freed blocks the allocator keeps; SmolLM2 LoRA 1x1024 with recompute), one buffer 2-5 MB.
# Both are held with the weight, weakly: they go with it.
_FROZEN: dict[str, Any] = {"key": None, "cast": None, "logits": None}


def _frozen_head(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, Any] | None:
    """The cache of `weight` in `dtype` (made on first use; "cast" None where the weight is in `dtype`) where
    it is frozen, else None."""
    if weight.requires_grad:
        return None
    key = (id(weight), weight.data_ptr(), weight.shape, torch_compat.version_counter(weight), dtype)
    if _FROZEN["key"] != key:
        _forget_frozen()  # the old copy goes before the new one is made
        forget = weakref.finalize(weight, _forget_frozen)
        forget.atexit = False
        cast = None if weight.dtype == dtype else weight.detach().to(dtype)  # None: the weight itself
        _FROZEN.update(key=key, cast=cast, forget=forget)
    return _FROZEN


def _forget_frozen() -> None:
    forget = _FROZEN.pop("forget", None)
    if forget is not None:
        forget.detach()
    _FROZEN.update(key=None, cast=None, logits=None)


def _logits_buffer(frozen: dict[str, Any] | None, rows: int, w: torch.Tensor) -> torch.Tensor | None:
    if frozen is None:
        return None
    buffer = frozen["logits"]
    if buffer is None or buffer.shape != (rows, w.shape[0]) or buffer.dtype != w.dtype:
        frozen["logits"] = None
        buffer = frozen["logits"] = w.new_empty(rows, w.shape[0])
    return buffer


def _logits(hc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, buffer: torch.Tensor | None):
    """F.linear(hc, w, b), written into the first rows of `buffer` where one is given (the same product)."""
    if buffer is None:
        return F.linear(hc, w, b)
    out = buffer[: hc.shape[0]]
    return torch.mm(hc, w.t(), out=out) if b is None else torch.addmm(b, hc, w.t(), out=out)


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i r_i CE(post(h_i @ W.T + b), y_i), chunk by chunk (r: per-row weights, or all 1); the
    gradients are computed in the forward.

    post(z) = softcap * tanh(z * scale / softcap) (or z * scale without softcap). Matmuls run in
    `compute_dtype`, the CE math in float32; grads come back in the dtypes of h, weight and bias.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, compute_dtype, scale, softcap, chunk, want_grad, rows=None):
        need_h, need_w, need_b = (want_grad and n for n in ctx.needs_input_grad[:3])
        if not need_w:  # no weight gradient summed per chunk: smaller chunks cost nothing, hold less
            chunk = min(chunk, FROZEN_HEAD_CHUNK)
        with torch.autocast(h.device.type, enabled=False):
            frozen = _frozen_head(weight, compute_dtype)
            w = weight.to(compute_dtype) if frozen is None or frozen["cast"] is None else frozen["cast"]
            buffer = _logits_buffer(frozen, chunk, w)  # one size whatever the rows: reused from step to step
            b = None if bias is None else bias.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            gh = torch.empty_like(h) if need_h else None
            gw = None  # float32, from the first chunk's product (no zero fill of a vocabulary-sized matrix)
            gb = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            plain = scale == 1.0 and softcap is None and rows is None
            want = need_h or need_w or need_b
            for s, e in _chunks(h.size(0), chunk):
                hc, yc = h[s:e].to(compute_dtype), targets[s:e]
                z = _logits(hc, w, b, buffer)
                if plain:
                    nll, g = _plain_ce(z, yc, want)
                else:
                    rc = None if rows is None else rows[s:e].float()
                    nll, g = _post_ce(z.float(), yc, scale, softcap, rc, want)
                total += nll.sum()
                if g is None:
                    continue
                if gb is not None:
                    gb += g.sum(0, dtype=torch.float32)
                g = g.to(compute_dtype)
                if gh is not None:
                    gh[s:e] = g @ w
                if need_w:
                    part = g.t() @ hc
                    gw = part.float() if gw is None else gw.add_(part)
            if need_w and gw is None:  # no targets: a zero gradient still reaches every parameter (DDP)
                gw = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "used", False):  # the weight gradient was scaled in place the first time
            raise RuntimeError("the target-only loss head back-propagates once (no retain_graph)")
        ctx.used = True
        gh, gw, gb = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if gh is None else gh * grad_out.to(gh.dtype),
            None if gw is None else gw.mul_(grad_out).to(w_dtype),  # in place: backward runs once
            None if gb is None else (gb * grad_out).to(b_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _post_ce(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    softcap: float | None,
    rows: torch.Tensor | None,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy of post(z) for float32 logits `z`, weighted by `rows` (or not), and its float32
    gradient with respect to z (None without `want_grad`; written over `z`)."""
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, targets[:, None]).squeeze(1)
    if rows is not None:
        nll = nll * rows
    if not want_grad:
        return nll, None
    g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    g[torch.arange(len(targets), device=g.device), targets] -= 1.0  # d CE / d post(z)
    if rows is not None:
        g.mul_(rows[:, None])
    if softcap is not None:
        g.mul_(1.0 - t * t)
    if scale != 1.0:
        g.mul_(scale)
    return nll, g


# Rows of logits upcast to float32 at a time for the log-sum-exp: a block stays in the cache (a 49k-vocabulary
# float32 row is 192 KiB) and no logits-sized float32 tensor is allocated.
LSE_BLOCK_ROWS = 8


def _plain_ce(
    z: torch.Tensor, targets: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy of logits `z` (rows, vocab) in float32, and its gradient softmax(z) - onehot in
    z's dtype (None without `want_grad`; else written over `z`), with two passes over `z`: the float32
    log-sum-exp over small row blocks, and one fused softmax kernel (it computes in float32 and rounds once,
    the rounding of the float32 softmax). Each target's entry is set from float32 (exp(-nll) - 1, rounded
    once). For bf16 logits from a bf16 matmul the float32 log-sum-exp sees exactly the values an upcast
    would. (`_post_ce` is the path with scale, softcap or row weights.)"""
    lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    block = torch.empty(min(LSE_BLOCK_ROWS, z.shape[0]), z.shape[1], dtype=torch.float32, device=z.device)
    for r in range(0, z.shape[0], LSE_BLOCK_ROWS):
        part = block[: min(LSE_BLOCK_ROWS, z.shape[0] - r)]
        torch.logsumexp(part.copy_(z[r : r + LSE_BLOCK_ROWS]), dim=-1, out=lse[r : r + LSE_BLOCK_ROWS])
    index = torch.arange(len(targets), device=z.device)
    nll = lse - z[index, targets].float()
    if not want_grad:
        return nll, None
    g = torch_compat.softmax_(z)  # over the logits: nothing reads them after
    g[index, targets] = torch.exp(-nll).sub_(1.0).to(g.dtype)  # d CE / d z at the target
    return nll, g


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class TargetLossHead:
    """Summed next-token NLL computed only at target positions; build once per run with `for_model`.

    `head(model, batch)` takes the model as the training loop calls it (possibly a DDP/accelerate
    wrapper of the model given to `for_model`). `mode` is "target" (the chunked path) or "full"
    (`full_nll`, with `reason` saying why).
    """

    weighs_targets = True  # honours batch["target_weights"] (trainer/objective.py checks)

    def __init__(
        self, unwrapped: nn.Module, chunk_tokens: int = 4096, mode: str = "target", reason: str = ""
    ):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.mode, self.reason = mode, reason
        self._out = unwrapped.get_output_embeddings() if mode == "target" else None
        # (object, attribute, neutral value) switched off during the call; their effect is applied here
        self._neutral: list[tuple[Any, str, Any]] = []
        self.scale, self.softcap = 1.0, None
        # optional fused kernel (weight, hidden [N, H], targets [N], bias) -> summed NLL, e.g. Liger's
        # fused linear cross-entropy (model/kernels.py); used when it can apply the same head (scale 1)
        self.fused_ce: Any = None
        cfg = getattr(unwrapped, "config", None)
        if mode == "target":
            if getattr(cfg, "final_logit_softcapping", None) is not None:  # Gemma-2/3
                self.softcap = float(cfg.final_logit_softcapping)
                self._neutral.append((cfg, "final_logit_softcapping", None))
            if _number(getattr(unwrapped, "logit_scale", None)):  # Cohere: logits * self.logit_scale
                self.scale *= float(unwrapped.logit_scale)
                self._neutral.append((unwrapped, "logit_scale", 1.0))
            if (
                _number(getattr(cfg, "logits_scaling", None)) and cfg.logits_scaling != 1
            ):  # Granite: logits / it; MiniCPM3: hidden / it (no bias: same)
                self.scale /= float(cfg.logits_scaling)
                self._neutral.append((cfg, "logits_scaling", 1.0))

    @classmethod
    def for_model(cls, model: nn.Module, chunk_tokens: int = 4096) -> "TargetLossHead":
        """`model`: the unwrapped HF causal LM. Falls back to mode "full" when unsupported."""
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(out) is not nn.Linear or not out.weight.is_floating_point() or out.weight.is_meta:
            reason = f"output embedding is {type(out).__name__}, not a plain floating-point nn.Linear"
        else:
            head = cls(model, chunk_tokens)
            reason = head._self_check(model)
            if not reason:
                log.info(
                    "loss head: target-only (chunks of %d rows, scale %g, softcap %s)",
                    chunk_tokens,
                    head.scale,
                    head.softcap,
                )
                return head
        log.warning("loss head: full logits (%s)", reason)
        return cls(model, chunk_tokens, mode="full", reason=reason)

    @contextmanager
    def _hidden_states_as_logits(self):
        """Within: `model(...).logits` is the final hidden state (output projection = identity)."""
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self._neutral]
        with torch_compat.replaced_forward(
            self._out, _identity
        ):  # an accelerate hook's forward is put back after
            try:
                for obj, name, value in self._neutral:
                    setattr(obj, name, value)
                yield
            finally:
                for obj, name, value in saved:
                    setattr(obj, name, value)

    def _compute_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        dev = hidden.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return torch.promote_types(hidden.dtype, self._out.weight.dtype)

    def _post(self, z: torch.Tensor) -> torch.Tensor:
        """The model's logit post-processing, in float32 (self-check only)."""
        z = z.float() * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def _self_check(self, model: nn.Module) -> str:
        """Compare hidden-path logits with the model's own on a tiny input; '' if they match."""
        w = self._out.weight
        ids = (torch.arange(16, device=w.device).view(2, 8) * 37 + 5) % w.size(0)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits.float()
                with self._hidden_states_as_logits():
                    hidden = model(input_ids=ids, use_cache=False).logits
                if hidden.shape != (2, 8, w.size(1)):
                    return f"hidden-state path gave shape {tuple(hidden.shape)}, expected (2, 8, {w.size(1)})"
                ours = self._post(F.linear(hidden.to(w.dtype), w, self._out.bias))
        except Exception as e:  # unknown architecture: the reference path still works
            return f"self-check failed: {type(e).__name__}: {e}"
        finally:
            for m, training in modes.items():
                m.train(training)
        tol = 1e-4 if w.dtype == torch.float32 else 2e-2
        err = (ours - ref).abs().max().item()
        if ref.shape != ours.shape or not err <= tol * max(1.0, ref.abs().max().item()):
            return f"self-check mismatch: max |diff| {err:.3g} vs the model's own logits"
        return ""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode != "target":
            return full_nll(model, batch)
        with self._hidden_states_as_logits():
            hidden = model_forward(model, batch).logits  # [B, T, H]
        weights, positions = batch.get("target_weights"), hidden
        if (
            "shift_labels" in batch
        ):  # a sequence-parallel shard: already shifted, every position has its target
            targets = batch["shift_labels"]
        else:
            targets, positions = batch["labels"][:, 1:], hidden[:, :-1]
            weights = None if weights is None else weights[:, 1:]
        mask = targets != IGNORE_INDEX
        h, y = positions[mask], targets[mask]  # [N, H], [N]
        rows = None if weights is None else weights[mask]
        out = self._out
        if self.fused_ce is not None and self.scale == 1.0 and rows is None:
            return self.fused_ce(out.weight, h, y, out.bias)
        return _ChunkedLinearCE.apply(
            h,
            out.weight,
            out.bias,
            y,
            self._compute_dtype(hidden),
            self.scale,
            self.softcap,
            self.chunk_tokens,
            torch.is_grad_enabled(),
            rows,
        )
