"""The engine a run is spread over, chosen by `accelerate launch` (one process, DDP, FSDP2 or
DeepSpeed ZeRO), and the few places where the training loop must know which one it is.

sftlab never shards anything itself: `accelerate launch --config_file configs/accelerate/X.yaml`
sets the engine, Accelerate's `prepare` wraps the model (DDP, `fully_shard`, DeepSpeed's engine),
and `save_state`/`load_state`/`get_state_dict` write and read its checkpoints. What is engine
specific here:

- `build_accelerator`: Accelerate only turns FSDP on for accelerator devices; on CPU (gloo) it
  would silently fall back to DDP. sftlab turns Accelerate's own FSDP plugin on there too (the same
  assignment Accelerate makes for GPUs), so FSDP runs -- and is tested -- on a CPU machine.
  DeepSpeed on a machine without CUDA gets the gloo backend.
- Loss normalisation: every engine averages gradients over the data-parallel ranks (DDP's
  all-reduce, FSDP's reduce-scatter, ZeRO's averaged reduction), so the loop multiplies each rank's
  summed NLL by world / global target count in all of them (tests check each against one process).
- DeepSpeed steps inside its engine: sftlab marks the accumulation boundary itself
  (`set_gradient_accumulation_boundary`), backpropagates without DeepSpeed's 1/GAS scaling, and
  calls `engine.step()`, which clips to `optim.max_grad_norm` (written into the DeepSpeed config
  with the micro-batch size) and reports the gradient norm.
- FSDP wraps the model's `_no_split_modules` classes that the model holds (`fit_fsdp_wrap_classes`):
  a vision-language model's list can name a class of a sub-model it lacks (LLaVA: CLIPTextEmbeddings).
- Sharded engines run forwards collectively: evaluation runs the same number of batches on every
  rank, and the final model is gathered on every rank (`full_state_dict`) and saved by the main one.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    parse_flag_from_env,
)

from sftlab.compat import accelerate as accelerate_compat
from sftlab.compat import transformers as transformers_compat
from sftlab.errors import SftlabError

SINGLE, DDP, FSDP, DEEPSPEED = "single", "ddp", "fsdp", "deepspeed"


class EngineError(SftlabError, RuntimeError):
    """The run's settings do not work with the engine `accelerate launch` chose."""


def engine_of(accelerator: Accelerator) -> str:
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return FSDP
    if kind == DistributedType.DEEPSPEED:
        return DEEPSPEED
    return DDP if accelerator.num_processes > 1 else SINGLE


def sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: forwards and state gathering are collective calls."""
    return engine_of(accelerator) in (FSDP, DEEPSPEED)


def build_accelerator(mixed_precision: str, cpu: bool, **kwargs: Any) -> Accelerator:
    """The run's Accelerator, for whatever `accelerate launch` (or torchrun + env) asked for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _quiet_deepspeed_on_cpu()
    fsdp, deepspeed = parse_flag_from_env("ACCELERATE_USE_FSDP"), parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if cpu and world > 1 and not deepspeed:
        # gloo processes: without this Accelerate finds no GPU and runs each rank as a lone process
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif deepspeed and cpu and world > 1:
        # DeepSpeed's CPU accelerator; without a backend Accelerate would count one process
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if fsdp:
        # torch warns for every FSDP unit whose forward returns a view (embedding, norm, the loss head's
        # identity projection): the loop does no in-place op on them; tests compare gradients with one process
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    accelerator = Accelerator(mixed_precision=mixed_precision, **kwargs)
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _enable_cpu_fsdp(accelerator, mixed_precision)
    return accelerator


def _quiet_deepspeed_on_cpu() -> None:
    """Accelerate imports DeepSpeed, when installed, even in single-process runs (`unwrap_model`); on a
    machine without CUDA its accelerator detection then warns on every run. Naming the CPU accelerator
    (unless the user chose one) is the same choice without the warning."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _enable_cpu_fsdp(accelerator: Accelerator, mixed_precision: str) -> None:
    """Accelerate's FSDP plugin (configured from the FSDP_* variables `accelerate launch` sets) on a
    multi-CPU state, which Accelerate itself runs as DDP: the assignment its AcceleratorState makes
    for multi-GPU states (nothing else in the Accelerator depends on it before `prepare`)."""
    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerate_compat.force_fsdp(accelerator, plugin)


def check_run_settings(accelerator: Accelerator, cfg) -> None:
    """Settings an engine cannot honour fail before any weights are loaded."""
    engine = engine_of(accelerator)
    if engine == DEEPSPEED and cfg.train.on_nan == "skip_step":
        raise EngineError("train.on_nan=skip_step: DeepSpeed updates inside its engine and cannot skip a step; "
                          "use on_nan: stop (the loss is checked before the step, the gradient norm after it)")
    if sharded(accelerator) and cfg.train.compile is True:
        raise EngineError(f"train.compile is not supported with {engine} in sftlab; turn it off")
    if sharded(accelerator) and cfg.peft is not None and cfg.peft.quantize:
        raise EngineError(f"QLoRA (peft.quantize) is not supported with {engine} in sftlab; use LoRA or one process")


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config from the run config before `prepare` (sftlab owns these values)."""
    if engine_of(accelerator) != DEEPSPEED:
        return
    conf = accelerator.state.deepspeed_plugin.deepspeed_config
    conf["train_micro_batch_size_per_gpu"] = micro_batch_size
    conf["gradient_accumulation_steps"] = 1  # sftlab marks the boundary itself
    conf["train_batch_size"] = micro_batch_size * accelerator.num_processes
    conf["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0


def fit_fsdp_wrap_classes(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """FSDP's units: the model's `_no_split_modules` classes that it actually holds. transformers collects
    that list from the model's sub-models' classes, and Accelerate refuses a class it cannot find: LLaVA's
    CLIP vision tower lists CLIPTextEmbeddings (of CLIP's text model, absent). A class the recipe names
    (fsdp_transformer_layer_cls_to_wrap) is kept as the user wrote it."""
    if engine_of(accelerator) != FSDP or accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is not None:
        return
    present = {type(m).__name__ for m in model.modules()}
    listed = transformers_compat.no_split_modules(model)
    if set(listed) - present:  # else Accelerate's own reading of the list is left as it is
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = sorted(n for n in listed if n in present)


def zero_stage(accelerator: Accelerator) -> int | None:
    if engine_of(accelerator) != DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextmanager
def unpartitioned_loading(accelerator: Accelerator):
    """Within: transformers loads whole weights even under a ZeRO-3 config (no `zero.Init`), so the
    model is built, wrapped and checked like any other; DeepSpeed partitions it in `prepare`."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def target_loss_head_supported(accelerator: Accelerator) -> tuple[bool, str]:
    """The target-only loss head reads the output projection's weight outside its forward: ZeRO-3
    keeps it partitioned there (FSDP's output head group stays gathered after the forward)."""
    if zero_stage(accelerator) == 3:
        return False, "DeepSpeed ZeRO-3 partitions the output projection outside its forward"
    return True, ""


def backward(accelerator: Accelerator, model, loss: torch.Tensor, boundary: bool) -> None:
    """Back-propagate one micro-batch's loss; `boundary`: the last micro-batch of the optimizer step."""
    if engine_of(accelerator) == DEEPSPEED:
        model.set_gradient_accumulation_boundary(boundary)
        model.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step
    else:
        accelerator.backward(loss)


def deepspeed_step(model) -> float:
    """DeepSpeed's optimizer step (with its clipping); returns the gradient norm before clipping."""
    model.step()
    norm = model.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def leave_together(accelerator: Accelerator) -> None:
    """At the end of a multi-process run every rank waits for the main one (still saving the model) and
    the process group is taken down before the interpreter exits: a rank exiting alone with the group
    alive was seen to abort in DeepSpeed/gloo's threads ("terminate called without an active exception")."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.state.destroy_process_group()


def full_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered from the shards (a collective call on sharded engines:
    every rank calls it; the main process gets the full tensors)."""
    state = accelerator.get_state_dict(model)
    if state is None:  # ZeRO-3 gathers onto the main process only
        return {}
    names: dict[int, list[str]] = {}  # tied parameters (embeddings = output head) are saved once, as transformers does
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {n for group in names.values() for n in group[1:]}
    return {k: v.detach().to("cpu") for k, v in state.items() if k not in tied}


def sharded_checkpoint_weights(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights from a sharded checkpoint, read in one process (for generate/chat/eval
    from a checkpoint directory); None when `ckpt` is not sharded. FSDP: the torch distributed checkpoint
    files, resharded into `model`'s full tensors. DeepSpeed: its fp32 master weights (`zero_to_fp32`)."""
    fsdp_dir, zero_dir = ckpt / "pytorch_model_fsdp_0", ckpt / "pytorch_model"
    if fsdp_dir.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(fsdp_dir))  # no process group: the shards, read into the model's tensors
        return state["model"]
    if zero_dir.is_dir():
        _quiet_deepspeed_on_cpu()
        try:
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )
        except ImportError:
            raise EngineError(f"{ckpt} is a DeepSpeed checkpoint: reading it needs `pip install deepspeed`") from None
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=zero_dir.name))
    return None
