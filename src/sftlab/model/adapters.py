"""LoRA, DoRA and QLoRA through peft: wrap a loaded model, save the adapter, merge it, load it back.

Everything here is peft's own machinery (`LoraConfig`, `get_peft_model`, `PeftModel`,
`merge_and_unload`) and transformers' bitsandbytes integration; sftlab only chooses the settings,
checks them before training, and records what a later `sftlab generate`/`export` needs:

- `wrap(model, settings, vocab_grew)`: `target_modules` are checked against the model's linear
  layers (an unknown name fails with the list of names there are); when the tokenizer grew
  (`data.add_chatml_tokens`), the input embeddings and the output head are added to
  `modules_to_save`, since the new rows must train. Returns the PeftModel and a line saying how
  many parameters train. On a vision-language model `all-linear` means the language model's linear
  layers (model/vision.py `language_targets`): the vision tower and projector keep their weights.
- `quantization_config(settings, skip)`: QLoRA's `BitsAndBytesConfig` (nf4 or int8 base weights; a
  vision-language model's vision tower and projector stay unquantized), or an `AdapterError` naming
  what is missing.
- `save_adapter(model, out, base)`: `adapter_model.safetensors` + `adapter_config.json` (peft's
  format; `base_model_name_or_path` is the local path the base was loaded from) and
  `sftlab_base.json`, the base model as configured (e.g. `default`), resolved again on load.
- `continue_adapter(base, adapter_dir)`: a saved adapter on its base, trainable again (a run whose
  `model.name_or_path` is an adapter directory continues that adapter; `base_of` names its base);
  inference loads an adapter the same way (trainer/inference.py `load_adapter_dir`) and merges it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from sftlab.config.schema import ModelConfig, PeftSettings
from sftlab.errors import SftlabError
from sftlab.model import linear
from sftlab.model.vision import is_vision_model, language_targets

BASE_FILE = "sftlab_base.json"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(SftlabError, RuntimeError):
    """A PEFT setting cannot be applied; the message names the setting and what to do."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded, as peft's all-linear does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head
    }
    return sorted(names)


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    return None


def _check_targets(model: nn.Module, targets: list[str] | str) -> None:
    if targets == "all-linear":
        return
    if isinstance(targets, str):  # a regular expression, matched by peft against the full module names
        matched = [
            n for n, m in model.named_modules() if re.fullmatch(targets, n) and isinstance(m, nn.Linear)
        ]
        if not matched:
            raise AdapterError(
                f"peft.target_modules: the pattern {targets!r} matches no linear layer of this model "
                "(peft matches it against full names such as "
                f"{next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), '?')!r}); "
                f"its linear layers are: {', '.join(linear_module_names(model))}"
            )
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {
        n for n, _ in model.named_modules()
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise AdapterError(
            f"peft.target_modules: no module named {', '.join(map(repr, missing))} in this model; "
            f"its linear layers are: {', '.join(linear_module_names(model))} (or use all-linear)"
        )


def modules_to_save(
    model: nn.Module, settings: PeftSettings, vocab_grew: bool
) -> tuple[list[str] | None, str]:
    """The configured modules_to_save, plus the embeddings and head when the vocabulary grew."""
    names = list(settings.modules_to_save or [])
    note = ""
    if vocab_grew:
        added = [
            n
            for n in (
                _module_name(model, model.get_input_embeddings()),
                _module_name(model, model.get_output_embeddings()),
            )
            if n and n not in names
        ]
        names += added
        if added:
            note = (
                f"; {', '.join(added)} added to modules_to_save (data.add_chatml_tokens grew the vocabulary: "
                "the new rows must train)"
            )
    return names or None, note


def wrap(model: PreTrainedModel, settings: PeftSettings, vocab_grew: bool = False) -> tuple[nn.Module, str]:
    """The model with LoRA/DoRA adapters (peft), and a line saying what trains."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as e:
        raise AdapterError(
            f"the peft section needs the peft package: pip install 'sftlab[lora]' ({e})"
        ) from None

    targets = settings.target_modules
    if targets == "all-linear" and is_vision_model(
        model
    ):  # the language model; the vision tower stays as it is
        targets = language_targets(model)
    _check_targets(model, targets)
    save, note = modules_to_save(model, settings, vocab_grew)
    if settings.quantize is not None:
        # casts norms/embeddings to fp32; activation checkpointing is the run's own choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_trainable(model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=save,
        use_dora=settings.method == "dora",
        use_rslora=settings.use_rslora,
        bias=settings.bias,
    )
    wrapped = get_peft_model(model, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    line = (
        f"{settings.method} r={settings.r} alpha={settings.alpha:g}{' (rsLoRA)' if settings.use_rslora else ''} "
        f"on {settings.target_modules}{' (the language model)' if targets != settings.target_modules else ''}"
        + (f", biases {settings.bias}" if settings.bias != "none" else "")
        + (f", base quantized {settings.quantize}" if settings.quantize else "")
        + f": {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%}){note}"
    )
    return wrapped, line


def keep_4bit_trainable(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its CPU inference kernel at the first forward
    in eval mode without gradients on an AVX512-BF16 CPU (a self-check, an evaluation), for good: every later
    forward, training ones included, then runs that kernel, which has no backward, so the gradient through
    the frozen base is silently lost. Training keeps the trainable layout (the flag the repacking checks)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _one_plain_adapter(layer: Any, args: tuple, kwargs: dict) -> str | None:
    """The layer's single active adapter when it is vanilla LoRA (no DoRA, no bias on lora_A/lora_B, not
    merged or disabled, no per-row adapter names); None otherwise. (`fuse_lora_forward` gives the fused
    forward only to layers on a plain `nn.Linear`.)"""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if (
        name in layer.lora_variant
        or layer.lora_B[name].bias is not None
        or layer.lora_A[name].bias is not None
    ):
        return None
    return name


class _LoraProduct(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T for a frozen base (W, b) and an adapter (A, B) scaled by s, all in x's
    dtype; s is applied as the `alpha` of the sums, so B needs no scaled copy (for a power-of-two s, as
    alpha / r usually is, the bits of peft's pre-scaled B). Backward gives the input gradient g W + s (g B) A as
    one matmul with the adapter's part added into it by `addmm_` (autograd would compute the two input-sized
    products apart and add them: a pass over (tokens, in_features) per layer, 4% of a LoRA step on a CPU),
    and the adapter's gradients s (g B)^T x and s g^T (x A^T). W is a tensor, or a `_Dequantized` 4-bit
    weight, dequantized for the forward product and again for the input gradient (never kept: QLoRA's
    memory)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scaling: float):
        ctx.dequantize = weight if isinstance(weight, _Dequantized) else None
        weight = weight() if ctx.dequantize else weight
        x = linear.shared_cast(x, weight.dtype)
        low = x @ down.t()
        ctx.save_for_backward(x, None if ctx.dequantize else weight, down, up, low)
        ctx.scaling = scaling
        base = torch.nn.functional.linear(x, weight, bias) if bias is not None else linear.mm(x, weight.t())
        return base.addmm_(low, up.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, low = ctx.saved_tensors
        grad_low = (grad @ up).mul_(ctx.scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.dequantize() if ctx.dequantize else weight
            grad_x = linear.mm(grad, weight).addmm_(grad_low, down)
        return grad_x, None, None, grad_low.t() @ x, (grad.t() @ low).mul_(ctx.scaling), None


class _Dequantized:
    """A bitsandbytes 4-bit weight (`Params4bit`, nf4 or fp4) as a callable giving it dequantized in `dtype`
    (`bitsandbytes.functional.dequantize_4bit` with the weight's quantization state, its `dtype` set to
    `dtype`: the bits of dequantizing to the stored dtype and casting, as bitsandbytes' backward does, in
    one pass: 0.21 against 0.56 ms for a 1536 x 576 nf4 weight on a 2-core Xeon)."""

    def __init__(self, weight: Any, dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype

    def __call__(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        state = copy.copy(self.weight.quant_state)
        state.dtype = self.dtype
        return dequantize_4bit(self.weight, state)


@functools.cache
def _linear_4bit() -> type | None:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes is optional (sftlab[qlora])
        return None
    return Linear4bit


def _is_4bit(layer: Any) -> bool:
    """A bitsandbytes 4-bit linear layer (`Linear4bit`, `LinearNF4`, `LinearFP4`)."""
    four_bit = _linear_4bit()
    return four_bit is not None and isinstance(layer, four_bit)


def _frozen_base(base: nn.Module, dtype: torch.dtype) -> list | None:
    """The frozen base layer's (weight, bias) for `_LoraProduct` in `dtype`: an `nn.Linear`'s cast, a
    bitsandbytes 4-bit layer's `_Dequantized` weight where `dtype` is the layer's compute dtype (the product
    bitsandbytes computes; its output then stays in that dtype, as autocast leaves a linear layer's). None
    where it does not apply (trainable base weights, another compute dtype, inside a compiled graph)."""
    if any(p.requires_grad for p in base.parameters(recurse=False)):
        return None
    if not _is_4bit(base):
        return [None if t is None else t.to(dtype) for t in (base.weight, base.bias)]
    state = getattr(base.weight, "quant_state", None)
    repacked = getattr(state, "packing_format_for_cpu", False)  # for bitsandbytes' CPU inference kernel
    if state is None or repacked or base.compute_dtype != dtype or torch.compiler.is_compiling():
        return None  # bitsandbytes' own forward (inside a compiled graph: as before this fusion)
    return [_Dequantized(base.weight, dtype), None if base.bias is None else base.bias.to(dtype)]


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward, base + scaling * lora_B(lora_A(dropout(x))), as two ops: the base
    product, then the adapter's product added into it in place by one `addmm_` with lora_B pre-scaled, so no
    separate scale, add and cast passes over the (tokens, out_features) output (in peft: ~20% of a bf16
    LoRA step on a CPU). The input is cast once to the autocast dtype for both products. The sum is rounded
    once (peft rounds the adapter product, its scaled copy and the sum). Without dropout on a frozen base, one
    autograd function (`_LoraProduct`) also sums the input gradient inside a matmul; on a 4-bit base
    (QLoRA) only that way, under autocast to the layer's compute dtype. Other cases run peft's forward."""
    name = _one_plain_adapter(self, args, kwargs)
    quantized = _is_4bit(self.base_layer)
    device, rows = x.device.type, x.shape[:-1]
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    plain = name is not None and isinstance(self.lora_dropout[name], nn.Identity)
    frozen = _frozen_base(self.base_layer, dtype) if plain and (autocast or not quantized) else None
    if name is None or (quantized and frozen is None):
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)
    scaling = self.scaling[name]
    # the input is cast inside `_LoraProduct`, once for the layers that read it (`linear.shared_cast`)
    if frozen is not None:
        down, up = (m[name].weight.to(dtype) for m in (self.lora_A, self.lora_B))
        result = _LoraProduct.apply(x.reshape(-1, x.shape[-1]), *frozen, down, up, float(scaling))
        return result.view(*rows, result.shape[-1])
    up = self.lora_B[name].weight * scaling
    x = x.to(dtype).reshape(-1, x.shape[-1])  # 2-d: the in-place sum is on the product itself, not a view
    result = self.base_layer(x)
    low = torch.nn.functional.linear(self.lora_dropout[name](x), self.lora_A[name].weight).to(result.dtype)
    return result.addmm_(low, up.to(result.dtype).t()).view(*rows, result.shape[-1])


@functools.cache
def _fused_lora_classes() -> dict[type, type]:
    """peft's LoRA layer classes this fuses (`Linear`; bitsandbytes' `Linear4bit` where bitsandbytes is
    installed) -> their subclass with `_fused_lora_forward`, created once (peft is optional) and reachable
    as `sftlab.model.adapters.FusedLoraLinear` / `FusedLora4bitLinear`, so a model holding one still pickles."""
    from peft.tuners.lora import Linear as LoraLinear

    bases = {"FusedLoraLinear": LoraLinear}
    try:
        from peft.tuners.lora.bnb import Linear4bit as Lora4bit

        bases["FusedLora4bitLinear"] = Lora4bit
    except ImportError:  # no bitsandbytes: peft defines no 4-bit LoRA layer
        pass
    fused = {}
    for name, base in bases.items():
        fused[base] = globals()[name] = type(
            name, (base,), {"forward": _fused_lora_forward, "__module__": __name__}
        )
    return fused


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every peft LoRA `Linear` on a plain `nn.Linear` base, and every 4-bit one on a bitsandbytes
    `Linear4bit` (QLoRA nf4/fp4), the fused forward above (its class becomes a subclass of peft's, state dict
    and saving unchanged); returns how many. Not for sharded engines (FSDP/DeepSpeed gather a module's
    weights when it is called, and lora_B's weight is read here directly); 8-bit bases keep peft's."""
    fused = _fused_lora_classes()
    count = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if type(module) in fused and (type(base) is nn.Linear or _is_4bit(base)):
            module.__class__ = fused[type(module)]
            count += 1
    return count


def quantization_config(settings: PeftSettings, skip: list[str] | None = None) -> Any:
    """transformers' BitsAndBytesConfig for peft.quantize (QLoRA); `skip`: modules kept unquantized (a
    vision-language model's vision tower, projector and head: model/vision.py `full_precision_modules`)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise AdapterError(
            f"peft.quantize={settings.quantize} needs bitsandbytes: pip install 'sftlab[qlora]' "
            f"(or set peft.quantize: null for LoRA on unquantized weights) ({e})"
        ) from None
    from transformers import BitsAndBytesConfig

    if settings.quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def save_adapter(model: nn.Module, out: Path, base: ModelConfig, state_dict: dict | None = None) -> None:
    """peft's adapter files, plus the base model as configured (so `default` resolves on any machine).
    `state_dict`: the whole model's tensors when they were gathered from shards (peft keeps the adapter's)."""
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)  # None: peft takes the model's
    (Path(out) / BASE_FILE).write_text(json.dumps(base.model_dump(mode="json"), indent=1) + "\n")


def base_config(adapter_dir: str | Path) -> ModelConfig:
    """The base model of an adapter directory: as sftlab recorded it, else as peft recorded it."""
    path = Path(adapter_dir)
    if (path / BASE_FILE).is_file():
        return ModelConfig(**json.loads((path / BASE_FILE).read_text()))
    recorded = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not recorded:
        raise AdapterError(f"{path}: the adapter does not record its base model")
    return ModelConfig(name_or_path=recorded)


def continue_adapter(
    base: PreTrainedModel, adapter_dir: str | Path, trainable: bool = True
) -> tuple[nn.Module, str]:
    """The saved adapter on `base`, its parameters trainable again (peft's `is_trainable`): the same
    trainable names as the run that saved it. Returns the PeftModel and a line saying what trains."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise AdapterError(
            f"continuing the adapter in {adapter_dir} needs the peft package: "
            f"pip install 'sftlab[lora]' ({e})"
        ) from None
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    trained, total = model.get_nb_trainable_parameters()
    return model, (
        f"continuing the adapter in {adapter_dir} (base {base_config(adapter_dir).name_or_path}): "
        f"{trained:,} trainable parameters of {total:,} ({trained / total:.2%})"
    )


def settings_of(conf: Any) -> PeftSettings:
    """The `peft` section describing a LoRA config (peft's `LoraConfig`, or its adapter_config.json as a
    dict): what a run continuing that adapter records in its config."""
    get = conf.get if isinstance(conf, dict) else (lambda k, d=None: getattr(conf, k, d))
    targets = get("target_modules")
    if isinstance(targets, (set, list, tuple)):
        targets = sorted(targets)
    return PeftSettings(
        method="dora" if get("use_dora", False) else "lora",
        r=get("r"),
        alpha=float(get("lora_alpha")),
        dropout=get("lora_dropout", 0.0),
        target_modules="all-linear"
        if targets in ("all-linear", None)
        else targets
        if isinstance(targets, str)
        else list(targets),
        modules_to_save=sorted(get("modules_to_save")) if get("modules_to_save") else None,
        use_rslora=bool(get("use_rslora", False)),
        bias=get("bias", "none") or "none",
    )


def continued_settings(
    model_cfg: ModelConfig, peft: PeftSettings | None, model: Any = None
) -> PeftSettings | None:
    """The peft section of a run: a PeftModel object's own adapter (the object is what trains, whatever
    the config says); else the configured one; else, when `model.name_or_path` is an adapter directory,
    that adapter's."""
    if model is not None and hasattr(model, "peft_config"):
        return settings_of(model.peft_config[getattr(model, "active_adapter", "default")])
    if peft is not None:
        return peft
    if model is None and is_adapter_dir(model_cfg.name_or_path):
        return settings_of(json.loads((Path(model_cfg.name_or_path) / ADAPTER_CONFIG).read_text()))
    return None


def base_of(model_cfg: ModelConfig) -> ModelConfig:
    """The base model a run saves with its adapter: the configured model, or -- when the run continued a
    saved adapter (`model.name_or_path` is an adapter directory) -- that adapter's own base."""
    return base_config(model_cfg.name_or_path) if is_adapter_dir(model_cfg.name_or_path) else model_cfg
