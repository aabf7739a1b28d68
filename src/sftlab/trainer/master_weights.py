"""fp32 master weights for bf16 training: `MasterWeightAdamW` and the bf16 compute copies of the weights.

*Updates that vanish in bf16 weights.* With `model.dtype: bfloat16` the weights themselves are bf16:
8 significant bits, so a weight w only changes if its update exceeds half a unit in the last place,
|w| * 2**-9 to |w| * 2**-8. An AdamW step moves each weight by about lr (2e-5), while a typical weight of 0.02
needs 6e-5 and a norm weight of 1.0 needs 4e-3: nearly every update rounds away and the model barely
learns. `MasterWeightAdamW` is the usual fix: the optimizer keeps fp32 "master" copies of the
low-precision parameters (and fp32 Adam moments); each step reads the model's gradients into the
masters, runs AdamW there, and writes the masters back into the model rounded to nearest. Small
updates accumulate in fp32 until they change the bf16 value. The model (forward/backward, saved
weights) stays bf16. Parameter memory is 2 (bf16 weight) + 4 (master) + 8 (fp32 moments) bytes, plus the
gradient (2 in bf16 during backward, 4 on the master at step time): no less than fp32 AdamW (16); what
bf16 saves is activation memory and matmul time. Checkpoints hold 12 bytes per parameter of optimizer state.

Design choices of `MasterWeightAdamW` (the loop adapts to them):

* It IS a `torch.optim.AdamW` whose `param_groups` hold the masters, built inside the constructor from
  the model parameters it is given (tensors or param groups, exactly like AdamW): Accelerate's wrapper,
  LR schedulers (they write `group["lr"]`) and `state_dict()` all work unchanged. fp32 (or fp64)
  parameters are their own masters, so a mixed model pays nothing for them.
* Gradients live on the model's bf16 `.grad` during backward, including accumulation across
  micro-batches: each micro-batch's gradient is added to the bf16 sum (a relative rounding of 2**-9 per
  addition, far below the noise of a mini-batch gradient, and Adam divides it out by sqrt(v) anyway).
  fp32 accumulation through `register_post_accumulate_grad_hook` was rejected: it has to move the
  gradient out of `.grad` after every backward, which breaks DDP (under `no_sync` the reducer all-reduces
  the gradient accumulated in `.grad` on the last micro-batch, so it would reduce only that one), and the
  optimizer is built before `accelerator.prepare` decides whether the model is wrapped in DDP.
* The gradients are moved to the masters (as fp32, model `.grad` then set to None) by `step()`, or
  earlier by `clip_grad_norm_(max_norm)`, which then clips on the fp32 master gradients and returns the
  fp32 total norm. That is the recommended clipping call (reach it through Accelerate's wrapper with
  `master_weight_optimizer(optimizer)`). Clipping the model parameters instead
  (`accelerator.clip_grad_norm_(model.parameters(), ...)`) is also valid before `step()`, since `step()`
  reads whatever is in the model `.grad`; it only computes the norm and the scaled gradients in bf16.
* `state_dict()` is AdamW's plus a `"master_weights"` entry {flat parameter index: fp32 tensor} for
  the low-precision parameters (tensors, ints, floats only: loadable with `torch.load(weights_only=True)`).
  `load_state_dict` restores the masters bitwise and writes them back into the model, so a resumed run
  continues exactly (`load_masters`: the masters alone). A state dict without that entry (from a plain
  AdamW) takes the masters from the current model weights.
* Masters follow their model parameter's device: if the model is moved after the optimizer was built
  (`accelerator.prepare` moves the model to the GPU), the masters and their state move on next use.
  Not supported: FSDP/DeepSpeed (they shard or replace parameters; use their own mixed precision), sparse
  gradients, and a GradScaler (Accelerate's fp16 mixed precision: it unscales the optimizer's param
  grads, which are the masters' and still empty at that point). fp16 weights are accepted but get no loss
  scaling, so their small gradients underflow: use bf16.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "master_weights"


# ---------------------------------------------------------------------------- fp32 master weights


def needs_master_weights(model: torch.nn.Module) -> bool:
    """True when some trainable parameter is bf16/fp16: plain AdamW would lose small updates there."""
    return any(p.requires_grad and p.dtype in LOW_PRECISION for p in model.parameters())


def master_weight_optimizer(optimizer) -> MasterWeightAdamW | None:
    """The MasterWeightAdamW inside `optimizer` (possibly wrapped by Accelerate's AcceleratedOptimizer), else None."""
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, MasterWeightAdamW):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of low-precision (bf16/fp16) model parameters; see the module docstring.

    Build it exactly like `torch.optim.AdamW`, passing the MODEL's parameters or param groups (with their
    own hyperparameters): `MasterWeightAdamW(groups, lr=2e-5, betas=(0.9, 0.999), eps=1e-8)`. The
    optimizer's `param_groups` then hold the masters (same structure and hyperparameters); fp32 parameters
    are their own masters. A training step is the usual

        loss.backward()                      # grads in the model's (bf16) .grad, accumulating across micro-batches
        opt.clip_grad_norm_(max_norm)        # optional: moves grads to the fp32 masters, clips there
        opt.step()                           # AdamW on the masters, then model params = round(masters)
        opt.zero_grad(set_to_none=True)      # clears model and master grads
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **adamw_kwargs,
    ) -> None:
        # Set before AdamW.__init__, which calls our add_param_group for each group.
        self._model_param: dict[torch.Tensor, torch.Tensor] = {}  # master -> low-precision model param
        self._master_of: dict[int, torch.Tensor] = {}  # id(model param) -> its master (itself if fp32)
        self._grads_on_masters = False  # model grads were moved to the masters since the last zero_grad
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)

    # --- construction

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        masters = []
        for item in params:
            name, p = item if isinstance(item, tuple) else (None, item)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"MasterWeightAdamW optimizes tensors, got {type(p).__name__}")
            if id(p) in self._master_of:
                raise ValueError("some parameters appear in more than one parameter group")
            if p.dtype in LOW_PRECISION:
                m = p.detach().to(torch.float32, copy=True)  # a leaf that never enters autograd
                self._model_param[m] = p
            elif p.is_floating_point():
                m = p
            else:
                raise TypeError(f"MasterWeightAdamW can only optimize floating point tensors, got {p.dtype}")
            self._master_of[id(p)] = m
            masters.append(m if name is None else (name, m))
        group["params"] = masters
        super().add_param_group(group)

    # --- access

    def master_of(self, param: torch.Tensor) -> torch.Tensor:
        """The fp32 master of a model parameter (the parameter itself when it is fp32)."""
        return self._master_of[id(param)]

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(model param, master) for the low-precision parameters, in param_groups order."""
        return [
            (self._model_param[m], m)
            for g in self.param_groups
            for m in g["params"]
            if m in self._model_param
        ]

    def _follow_devices(self) -> None:
        """Move masters (and their state) to their model parameter's device if the model moved."""
        for p, m in self._pairs():
            if m.device != p.device:
                m.data = m.data.to(p.device)
                if m.grad is not None:
                    m.grad = m.grad.to(p.device)
                st = self.state.get(m)
                if st:
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor) and not (k == "step" and v.device.type == "cpu"):
                            st[k] = v.to(p.device)

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        """Model grads -> fp32 master grads (added if some were moved already since zero_grad); model grads -> None."""
        self._follow_devices()
        for p, m in self._pairs():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("MasterWeightAdamW does not support sparse gradients")
            if m.grad is None:
                m.grad = g.to(torch.float32)
            elif self._grads_on_masters:
                m.grad.add_(g)
            else:  # zero_grad(set_to_none=False) left a buffer to reuse
                m.grad.copy_(g)
            p.grad = None
        self._grads_on_masters = True

    @torch.no_grad()
    def _masters_to_model(self) -> None:
        for p, m in self._pairs():
            p.copy_(m)  # fp32 -> bf16/fp16: round to nearest even

    # --- the optimizer API

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Move the gradients to the fp32 masters and clip them there; returns the total norm (fp32).

        Same contract as `torch.nn.utils.clip_grad_norm_` over every parameter of this optimizer.
        """
        self._grads_to_masters()
        grads_of = [m for g in self.param_groups for m in g["params"] if m.grad is not None]
        return torch.nn.utils.clip_grad_norm_(
            grads_of, max_norm, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._grads_to_masters()
        super().step()
        self._masters_to_model()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)  # master grads (fp32 params: the model grads themselves)
        for p, _ in self._pairs():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self._grads_on_masters = False

    def state_dict(self) -> dict:
        """AdamW's state dict plus {"master_weights": {flat param index: fp32 master}} (references, like AdamW's state)."""
        sd = super().state_dict()
        flat = [m for g in self.param_groups for m in g["params"]]
        sd[MASTER_KEY] = {i: m for i, m in enumerate(flat) if m in self._model_param}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore AdamW's state and the masters (`load_masters`)."""
        saved = state_dict.get(MASTER_KEY)
        self._low_precision(saved)  # checked before anything is loaded
        super().load_state_dict({k: v for k, v in state_dict.items() if k != MASTER_KEY})
        self.load_masters(saved)

    @torch.no_grad()
    def load_masters(self, saved: dict[int, torch.Tensor] | None) -> None:
        """The masters bitwise from a state dict's "master_weights" (None: from the model's weights), then the model
        params = round(masters); AdamW's state stays as it is (train.load_best_model_at_end restores these only)."""
        self._follow_devices()
        for i, m in self._low_precision(saved):
            p = self._model_param[m]
            if saved is not None and saved[i].shape != m.shape:
                raise ValueError(
                    f"optimizer state dict: master weight {i} has shape {tuple(saved[i].shape)}, "
                    f"the parameter has {tuple(m.shape)}"
                )
            m.copy_(p if saved is None else saved[i])
            p.copy_(m)  # unchanged when the master was taken from it

    def _low_precision(self, saved: dict[int, torch.Tensor] | None) -> list[tuple[int, torch.Tensor]]:
        """(flat index, master) of the low-precision parameters; `saved` masters must be for exactly those."""
        flat = [m for g in self.param_groups for m in g["params"]]
        found = [(i, m) for i, m in enumerate(flat) if m in self._model_param]
        if saved is not None and set(saved) != {i for i, _ in found}:
            raise ValueError(
                "optimizer state dict: its master weights do not match this optimizer's low-precision "
                f"parameters (saved for indices {sorted(saved)[:8]}..., expected "
                f"{[i for i, _ in found][:8]}...); was it saved for a model of another dtype?"
            )
        return found


# ---------------------------------------------------------------------------- bf16 compute copies

Originals = list[tuple[torch.nn.Parameter, torch.Tensor]]


@torch.no_grad()
def use_bf16_weights(
    model: torch.nn.Module, matmul_only: bool = True, round_frozen: bool = False
) -> Originals:
    """Store weights in bf16 for compute; returns (parameter, its fp32 value before the cast) for
    every trainable parameter cast, to seed the fp32 master weights with (`seed_master_weights`; a frozen
    one has no master, so no fp32 copy of it is kept).

    `matmul_only=True` (bf16 mixed precision): only the matmul weights (every `nn.Linear` but a head
    tied to the input embedding) become bf16; embeddings and norms stay fp32. A frozen weight (a vision
    tower, a LoRA base) has no master to be restored from: it becomes bf16 where that is exact (it was
    stored in bf16), or with `round_frozen` (a LoRA run: only the adapter is saved from memory, the merged
    model reloads its base from disk), where autocast computes the same product from its bf16 rounding; else
    it stays as loaded (a full fine-tune saves it from memory) and autocast rounds it per op. Under bf16 autocast
    this computes what autocast computes from fp32 weights (autocast rounds each Linear weight to
    bf16 at every op; here it is rounded once per optimizer step, when `MasterWeightAdamW` writes the
    fp32 master back), without the per-op re-cast in forward and backward. Norm and embedding
    weights stay fp32 as under autocast. `matmul_only=False`: every floating parameter (pure bf16).

    The masters must start from the fp32 values, not from their bf16 rounding: off-grid fp32 weights
    let an update below half a bf16 ulp still move the rounded copy of some weights (as autocast
    does), while masters seeded on the grid hold every copy still until updates add up to half an
    ulp, and early training is measurably slower (0.56 vs 0.23 loss after one step at lr 2e-5 on the
    demo).
    """
    model.float()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = emb.weight if emb is not None else None
    originals: Originals = []
    kept_frozen, files = False, file_mappings()
    for module in model.modules():
        if matmul_only and not (isinstance(module, torch.nn.Linear) and module.weight is not emb_weight):
            continue
        for p in module.parameters(recurse=False):
            if not p.is_floating_point() or p.dtype == torch.bfloat16:
                continue
            if matmul_only and not (p.requires_grad or round_frozen or _exact_in_bf16(p)):
                kept_frozen = True
                continue  # frozen: autocast computes with its bf16 rounding, the weight itself stays as loaded
            if p.requires_grad:
                originals.append((p, p.detach().clone()))
            loaded, p.data = p.data, p.data.to(torch.bfloat16)
            release_file_pages(loaded, files)
    if not kept_frozen:
        _off_the_checkpoint_file(model, files)
    return originals


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages are dropped, others written out)


def release_file_pages(tensor: torch.Tensor, files: list[tuple[int, int]] | None = None) -> None:
    """Hand the pages of `tensor` back to the kernel where it is a view of a file's memory map (a weight read
    from a safetensors checkpoint, which transformers maps rather than copies): once its cast is made its pages
    are not needed, yet they count in the process's resident memory until the whole map is unmapped, after the
    last weight is cast (the fp32 file of SmolLM2 adds 540 MB to the peak of a LoRA run's setup). The hint
    keeps the contents (a page is read from the file again if touched, a written one is paged out, not
    lost); CPU tensors on Linux only, a no-op elsewhere and on kernels without it. `files`: `file_mappings()`,
    read once by a caller releasing many tensors (else read here)."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-tensor.untyped_storage().data_ptr() // page) * page  # whole pages inside the storage only
    end = (tensor.untyped_storage().data_ptr() + tensor.untyped_storage().nbytes()) // page * page
    files = file_mappings() if files is None else files
    if end > start and any(lo <= start < hi for lo, hi in files):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of files (/proc/self/maps names a path), not anonymous
    memory (the heap, a tensor's own allocation); [] where that cannot be read."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _off_the_checkpoint_file(model: torch.nn.Module, files: list[tuple[int, int]]) -> None:
    """The parameters left in fp32 (embeddings, norms) copied into memory of their own. Weights loaded from
    an fp32 safetensors file are views of its memory map, which stays mapped while any of them refers to it,
    with every page the casts above read: a whole fp32 copy of the matmul weights resident for the run. (Not
    done while a frozen matmul weight stays fp32: it keeps the map anyway.)"""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            loaded, p.data = p.data, p.data.clone()
            release_file_pages(loaded, files)


def _exact_in_bf16(p: torch.Tensor) -> bool:
    """True when bf16 holds `p` exactly (weights stored in bf16 and loaded as fp32): the cast loses nothing."""
    return bool(torch.equal(p.to(torch.bfloat16).to(p.dtype), p))


@torch.no_grad()
def seed_master_weights(optimizer, originals: Originals) -> None:
    """Give the fp32 masters the exact fp32 values the bf16 weights were rounded from."""
    master = master_weight_optimizer(optimizer)
    if master is None:
        return
    for p, value in originals:
        try:
            master.master_of(p).copy_(value)
        except KeyError:  # frozen, not optimized
            pass


@torch.no_grad()
def load_master_weights(model: torch.nn.Module, optimizer, frozen_too: bool = True) -> None:
    """The inverse of `use_bf16_weights`: every parameter fp32 again, holding its exact fp32 master
    (frozen parameters, which have none, keep their value). `frozen_too=False` (a LoRA run saving its
    adapter): only the optimized parameters; the frozen base stays in bf16 (an fp32 copy of it would add
    twice its size to the run's peak memory at the very end, for nothing: the adapter is what is saved)."""
    master = master_weight_optimizer(optimizer)
    if master is None:
        return
    if frozen_too:
        model.float()
    for p in model.parameters():
        try:
            fp32 = master.master_of(p)
        except KeyError:  # frozen, not optimized
            continue
        p.data = p.data.float()
        p.copy_(fp32)
