"""One function that rebuilds a run's model, for training, resume, inference, eval and export.

`build_run_model(cfg, tokens, purpose=...)` goes from a run's config (and, through the Python API,
a model object) to the model as that run has it:

1. the base: loaded in fp32 (or QLoRA-quantized for training) from `model.name_or_path`, or the
   model object given, or -- when `model.name_or_path` is a saved adapter (a LoRA run directory or
   any peft adapter directory) -- the base that adapter records; a vision-language model has the
   parts `model.freeze` names frozen for full fine-tuning (default its vision tower);
2. the vocabulary grown to the run's tokenizer (`data.add_chatml_tokens`, or an adapter trained
   with added tokens);
3. the adapter: a new one (`peft` section), the saved adapter continued (trainable again, the same
   parameter names as the run that saved it), or a PeftModel object as it is;
4. for training only: activation checkpointing, NEFTune, and the precision -- bf16 compute copies
   of the fp32 weights (`use_bf16_weights`) whose fp32 masters the optimizer seeds from the
   returned `originals` (trainer/master_weights.py).

Training and `sftlab generate`/`eval`/`export` of a checkpoint build the same module tree this
way, so the checkpoint's tensor names always match.

Around it, for a training run: `resolve_model_settings` settles the model's config before the run
starts (`model.dtype: auto` becomes the stored dtype; a continued adapter's settings become the peft
section), and `loss_function` picks the micro-batch loss the objective computes with for the built
model (the target-only chunked head, or full logits; Liger's kernels with train.liger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from sftlab.config.schema import SFTConfig
from sftlab.model import adapters, attention, mlp, vision
from sftlab.model.kernels import KernelError, apply_liger
from sftlab.model.loading import DTYPES, load_model, resolve_model_path, stored_dtype
from sftlab.model.loss import TargetLossHead, full_nll
from sftlab.model.vocab import resize_for_new_tokens
from sftlab.trainer import recompute
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.master_weights import use_bf16_weights
from sftlab.trainer.objective import LossFn
from sftlab.trainer.precision import bf16_weight_form
from sftlab.trainer.rundir import RunError


@dataclass
class RunTokens:
    """Where the base weights are, the run's tokenizer, and its size before ChatML tokens were added."""

    model_path: str
    tokenizer: Any
    vocab_before: int
    adapter_dir: str | None = None  # a saved adapter continued by this run


@dataclass
class RunModel:
    model: Any
    lines: list[str] = field(default_factory=list)  # what was done, for the console
    originals: Any = None  # fp32 weights replaced by bf16 compute copies (they seed the masters)
    recompute: bool = False  # activations recomputed in the backward (train.gradient_checkpointing)
    recompute_why: str = ""
    weight_form: str = "none"  # bf16 copies of fp32 masters: none | matmul | all (precision.bf16_weight_form)
    weight_form_why: str = ""
    packed_attention: str | None = (
        None  # documents | flex | mask where rows are packed (model/attention.choose)
    )
    packed_attention_why: str | None = None

    def decisions(self) -> dict[str, Any]:
        """What building the model decided, each with its reason (the run's `Resolved`)."""
        return {
            "recompute": self.recompute,
            "recompute_why": self.recompute_why,
            "weight_form": self.weight_form,
            "weight_form_why": self.weight_form_why,
            "packed_attention": self.packed_attention,
            "packed_attention_why": self.packed_attention_why,
        }


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def build_run_model(
    cfg: SFTConfig,
    tokens: RunTokens,
    purpose: str = "train",
    given: Any = None,
    mixed_precision: str = "no",
    sharded: bool = False,
) -> RunModel:
    """The run's model (module docstring). `purpose`: train | load (inference, eval, export: no
    quantization, no recomputation, no noise, fp32). `given`: a model object from the Python API."""
    training = purpose == "train"
    built = RunModel(given if given is not None else _load_base(cfg, tokens, training))
    if given is not None and any(
        p.dtype != torch.float32 for p in given.parameters() if p.is_floating_point()
    ):
        built.model = given.float()  # the fp32 masters start from the given weights
        built.lines.append("model: the given model object cast to float32 (fp32 master weights)")
    _grow_vocabulary(built.model, cfg, tokens)
    if training and cfg.peft is None and not tokens.adapter_dir and vision.is_vision_model(built.model):
        built.lines.append(
            vision.freeze(built.model, cfg.model.freeze)
        )  # model.freeze: default the vision tower
    _add_adapter(built, cfg, tokens, training)
    if training:
        _prepare_for_training(built, cfg, tokens, mixed_precision, sharded)
    return built


def _prepare_for_training(
    built: RunModel, cfg: SFTConfig, tokens: RunTokens, mixed_precision: str, sharded: bool
) -> None:
    """Packed attention, activation checkpointing, NEFTune and the bf16 weight copies, each decision with
    its reason kept on `built`."""
    dtype = torch.bfloat16 if mixed_precision == "bf16" or cfg.model.dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (
        cfg.data.packing != "none" or cfg.data.eval_packing
    ):  # packed rows: documents apart without a dense mask
        setting = cfg.train.packed_attention
        if (
            cfg.train.sequence_parallel > 1 and setting == "auto"
        ):  # Ulysses drops masks: positions cut documents
            setting = "documents"
        mode, why = attention.choose(setting, built.model, device, dtype)
        if setting != cfg.train.packed_attention:
            why = "train.sequence_parallel: Ulysses attends without a mask, the position ids cut documents"
        attention.use(built.model, mode)
        built.packed_attention, built.packed_attention_why = mode, why
        how = {
            "documents": "one causal SDPA call per document",
            "flex": "FlexAttention with a document block mask",
        }.get(mode, "the dense document mask")
        built.lines.append(f"packed attention: {how} ({why})")
    tokens_per_micro_batch = recompute.planned_tokens(cfg, getattr(tokens, "units", None))
    built.recompute, built.recompute_why = recompute.decide(
        cfg.train.gradient_checkpointing, built.model, tokens_per_micro_batch, dtype, device
    )
    if built.recompute:
        enable_activation_checkpointing(built.model)
    built.lines.append(
        f"gradient checkpointing: {'on' if built.recompute else 'off'} ({built.recompute_why})"
    )
    if cfg.train.neftune_alpha is not None:  # transformers' hook: noise in training forwards only
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(built.model, cfg.train.neftune_alpha)
    quantized = cfg.peft is not None and cfg.peft.quantize is not None
    form, built.weight_form_why = bf16_weight_form(
        mixed_precision, cfg.model.dtype, cfg.optim.name, quantized or sharded
    )
    built.weight_form = form
    if form != "none":
        # bf16 copies of the matmul weights (of every weight: pure bf16 without autocast) do the compute,
        # refreshed from the optimizer's fp32 master weights once per optimizer step (MasterWeightAdamW).
        built.originals = use_bf16_weights(
            built.model, matmul_only=form == "matmul", round_frozen=cfg.peft is not None
        )
    _fused_forwards(built, cfg, sharded)


def _fused_forwards(built: RunModel, cfg: SFTConfig, sharded: bool) -> None:
    """The SwiGLU MLPs recomputing silu in the backward (not with Liger: it brings its own), the LoRA layers'
    fused forward (on plain and 4-bit bases, not under FSDP/DeepSpeed); each said on `built`."""
    swiglus = 0 if cfg.train.liger else mlp.recompute_swiglu(built.model)
    if swiglus:
        built.lines.append(
            f"SwiGLU: silu recomputed in the backward in {swiglus} MLPs (saves gate and up only)"
        )
    if cfg.peft is not None and not sharded:
        fused = adapters.fuse_lora_forward(built.model)
        if fused:
            built.lines.append(
                f"LoRA forward: base and adapter products summed by one addmm_ in {fused} layers"
            )


def _load_base(cfg: SFTConfig, tokens: RunTokens, training: bool):
    """fp32 whatever model.dtype says (the fp32 master weights start from the stored values)."""
    quantize = training and cfg.peft is not None and cfg.peft.quantize
    base_cfg = adapters.base_config(tokens.adapter_dir) if tokens.adapter_dir else cfg.model
    quantization = (
        adapters.quantization_config(cfg.peft, vision.full_precision_modules(base_cfg, tokens.model_path))
        if quantize
        else None
    )
    settings = {"dtype": "float32", "attn_implementation": cfg.model.attn_implementation}
    return load_model(base_cfg.model_copy(update=settings), tokens.model_path, quantization)


def _grow_vocabulary(model, cfg: SFTConfig, tokens: RunTokens) -> None:
    if cfg.data.add_chatml_tokens:  # new rows (if any) and the model's eos follow the tokenizer
        resize_for_new_tokens(model, tokens.tokenizer, tokens.vocab_before, cfg.data.pad_vocab_to_multiple_of)
    elif tokens.adapter_dir and len(tokens.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(
            len(tokens.tokenizer), mean_resizing=False
        )  # the adapter holds the rows


def _add_adapter(built: RunModel, cfg: SFTConfig, tokens: RunTokens, training: bool) -> None:
    if is_peft_model(built.model):
        built.model.train(training)
        trainable, total = built.model.get_nb_trainable_parameters()
        built.lines.append(
            f"peft: the given PeftModel's adapter continues: {trainable:,} trainable of {total:,}"
        )
        return
    if tokens.adapter_dir:
        built.model, line = adapters.continue_adapter(built.model, tokens.adapter_dir, trainable=training)
        built.lines.append(f"peft: {line}")
        return
    if cfg.peft is not None:
        settings = cfg.peft if training else cfg.peft.model_copy(update={"quantize": None})
        built.model, line = adapters.wrap(
            built.model, settings, vocab_grew=len(tokens.tokenizer) > tokens.vocab_before
        )
        built.lines.append(f"peft: {line}")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation recomputation per decoder layer (transformers' API; renamed in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ---------------------------------------------------------------------------- a training run's model settings


def resolve_model_settings(
    cfg: SFTConfig, inputs: RunInputs, console: Console
) -> tuple[SFTConfig, str | None]:
    """The config with the model settings the run trains with: a continued adapter's peft section, and
    `model.dtype: auto` resolved; with the base model's path when that needed resolving, else None."""
    return with_resolved_dtype(with_continued_adapter(cfg, inputs), inputs, console)


def with_continued_adapter(cfg: SFTConfig, inputs: RunInputs) -> SFTConfig:
    """A run that continues an adapter (a PeftModel object, or model.name_or_path an adapter directory)
    records that adapter's settings as its peft section when none is configured."""
    peft = adapters.continued_settings(cfg.model, cfg.peft, inputs.model)
    return cfg if peft is cfg.peft else cfg.model_copy(update={"peft": peft})


def with_resolved_dtype(cfg: SFTConfig, inputs: RunInputs, console: Console) -> tuple[SFTConfig, str | None]:
    """`model.dtype: auto` becomes the dtype the weights were saved in (a given model object's own); with
    the base model's path when that needed resolving (the data phase reuses it), else None."""
    if cfg.model.dtype != "auto":
        return cfg, None
    path = None
    if inputs.model is not None:
        found = str(next(inputs.model.parameters()).dtype).removeprefix("torch.")
        dtype = found if found in DTYPES else "float32"
    else:
        base = adapters.base_of(cfg.model)
        path = resolve_model_path(base)
        dtype = stored_dtype(base, path)
    console.print(
        f"[bold]model.dtype[/bold]: auto -> {dtype} (the dtype the weights were saved in)", highlight=False
    )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})}), path


def loss_function(
    cfg: SFTConfig,
    model,
    accelerator: Accelerator,
    console: Console | None,
    engine_allows: tuple[bool, str] = (True, ""),
) -> LossFn:
    """The objective's per-batch NLL for `model` on the run's device: the target-only head where it
    applies (Liger's fused CE on CUDA)."""
    with accelerator.autocast():  # the head checks itself on the device and in the precision it trains in
        loss_fn = build_loss_fn(cfg, model, console, engine_allows)
    if cfg.train.liger:
        try:
            fused = apply_liger(model, accelerator.device.type, getattr(loss_fn, "softcap", None))
        except KernelError as e:
            raise RunError(str(e)) from None
        if isinstance(loss_fn, TargetLossHead):
            loss_fn.fused_ce = fused
    return loss_fn


def build_loss_fn(
    cfg: SFTConfig, model, console: Console | None, engine_allows: tuple[bool, str] = (True, "")
) -> LossFn:
    """The micro-batch loss: the target-only chunked head, or the model's full logits."""
    if cfg.train.loss_head == "full":
        return full_nll
    if not engine_allows[0]:
        if console is not None:
            console.print(f"[yellow]loss head[/yellow]: full logits ({engine_allows[1]})", highlight=False)
        return full_nll
    head = TargetLossHead.for_model(model, cfg.train.loss_chunk_tokens)
    if head.mode != "target" and console is not None:
        console.print(f"[yellow]loss head[/yellow]: full logits ({head.reason})", highlight=False)
    return head if head.mode == "target" else full_nll
