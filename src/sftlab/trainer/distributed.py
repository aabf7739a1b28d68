"""The engine a run is spread over, chosen by `accelerate launch` (one process, DDP, FSDP2 or
DeepSpeed ZeRO): how the Accelerator is built for it, and `Engine`, the one object that knows which
engine runs. `Engine.of(accelerator)` is made once per run (`Components.engine`); every other module asks it
(wrap, unwrap, gather, backward and step, checkpoint weights, refusals) and never tests the engine type
(tests/trainer/test_engine_seam.py fails on such a test outside this module and compat/).

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
- DeepSpeed steps inside its engine (`DeepSpeedEngine`): sftlab marks the accumulation boundary itself
  (`set_gradient_accumulation_boundary`), backpropagates without DeepSpeed's 1/GAS scaling, and
  calls `engine.step()`, which clips to `optim.max_grad_norm` (written into the DeepSpeed config
  with the micro-batch size) and reports the gradient norm.
- FSDP wraps the model's `_no_split_modules` classes that the model holds (`FSDPEngine.prepare`):
  a vision-language model's list can name a class of a sub-model it lacks (LLaVA: CLIPTextEmbeddings).
- Sharded engines run forwards collectively: evaluation runs the same number of batches on every
  rank, and the final model is gathered on every rank (`gathered_state_dict`) and saved by the main one.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Callable
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
from sftlab.paths import cache_root
from sftlab.trainer import checkpoint

SINGLE, DDP, FSDP, DEEPSPEED = "single", "ddp", "fsdp", "deepspeed"


class EngineError(SftlabError, RuntimeError):
    """The run's settings do not work with the engine `accelerate launch` chose."""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RankMismatch(SftlabError, RuntimeError):
    """The processes of one run do not agree on what they run (config, data, versions, layout)."""


def check_ranks_agree(accelerator: Accelerator, facts: dict[str, Any]) -> None:
    """Every rank's `facts` (config hash, versions, world layout, data fingerprint) equal rank 0's, else one
    error naming the first rank and the value that differ: a mismatch is an error at once, not a hang in a
    later collective. One process: nothing to compare."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    everyone = gather_object([facts])
    for rank, theirs in enumerate(everyone):
        for key, value in facts.items() if rank else ():
            if theirs.get(key) != everyone[0].get(key):
                raise RankMismatch(
                    f"rank {rank} runs with {key} = {theirs.get(key)!r}, rank 0 with {everyone[0].get(key)!r}: "
                    "every process of a run needs the same config, data, versions and layout"
                )


def first_on_each_node(accelerator: Accelerator, work: Callable[[], Any], poll_s: float = 0.5) -> Any:
    """`work()` on each node's first process, then on the node's other processes (reading what it cached).
    The others wait for a marker file in the node's cache root (paths.py), never in a collective: a first
    preparation of any length cannot meet the collective timeout. A failure of the first process is the
    others' error too (its message in the marker); one process just works. Only the token naming the
    marker is agreed in a collective, at once, as every rank arrives."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    marker = cache_root() / "ready" / f"{token}-node{os.environ.get('GROUP_RANK', '0')}"
    if accelerator.is_local_main_process:
        marker.parent.mkdir(parents=True, exist_ok=True)
        for old in marker.parent.iterdir():  # markers of runs a day old and more
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < time.time() - 86400:
                    old.unlink()
        try:
            result = work()
        except BaseException as e:
            marker.write_text(f"failed: {type(e).__name__}: {e}")
            raise
        marker.write_text("ok")
        return result
    while not marker.is_file():
        time.sleep(poll_s)
    state = marker.read_text()
    if state != "ok":
        raise EngineError(
            f"the node's first process could not prepare the data ({state.removeprefix('failed: ')})"
        )
    return work()


def follow_launcher() -> None:
    """A worker of `accelerate launch` / `torchrun` (LOCAL_RANK set, its parent the launcher's agent) dies
    with its launcher: Linux's parent-death signal, SIGKILL, so a launcher killed outright (kill -9, the OOM
    killer, a lost SSH session) never leaves workers training and writing checkpoints (the last complete
    checkpoint stays the last; a SIGTERM to the launcher still reaches the workers through it, and they
    checkpoint and stop). Elsewhere (one process, other systems) nothing is done."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here: the launcher's own signal handling remains
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def build_accelerator(
    mixed_precision: str, cpu: bool, dist_timeout: int | None = None, **kwargs: Any
) -> Accelerator:
    """The run's Accelerator, for whatever `accelerate launch` (or torchrun + env) asked for; with several
    processes, collectives wait at most `dist_timeout` seconds (train.dist_timeout)."""
    # Accelerate keeps one process-wide state: a later run in the same process (tests, notebooks) may
    # choose another mixed precision, so it starts from a clean one (the process group is kept).
    accelerate_compat.reset_state(reset_partial_state=False)
    follow_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _quiet_deepspeed_on_cpu()
    fsdp, deepspeed = (
        parse_flag_from_env("ACCELERATE_USE_FSDP"),
        parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"),
    )
    timeout = {"timeout": datetime.timedelta(seconds=dist_timeout)} if dist_timeout else {}
    if cpu and world > 1 and not deepspeed:
        # gloo processes: without this Accelerate finds no GPU and runs each rank as a lone process
        os.environ["ACCELERATE_USE_CPU"] = "true"
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**timeout)]
    elif deepspeed and cpu and world > 1:
        # DeepSpeed's CPU accelerator; without a backend Accelerate would count one process
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo", **timeout)]
    elif world > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**timeout)]
    if fsdp:
        # torch warns for every FSDP unit whose forward returns a view (embedding, norm, the loss head's
        # identity projection): the loop does no in-place op on them; tests compare gradients with one process
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    accelerator = Accelerator(mixed_precision=mixed_precision, **kwargs)
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _enable_cpu_fsdp(accelerator, mixed_precision)
    return accelerator


def launch_provides_ulysses() -> bool:
    """Whether `accelerate launch` started DeepSpeed, whose Ulysses attention runs train.sequence_parallel
    (read before the Accelerator exists: its ParallelismConfig depends on it)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


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


def resume_refusal(saved_engine: str, saved_world: int, engine: str, world: int) -> str | None:
    """Why a checkpoint written under `saved_engine` on `saved_world` processes cannot be continued under
    `engine` on `world` processes; None when it can. One process and DDP write whole weights and optimizer
    (any world size reads them); FSDP writes torch distributed checkpoint shards, which FSDP reshards onto
    any number of processes; DeepSpeed ZeRO partitions are per rank (its universal checkpoint conversion is
    not wired in)."""
    moved = f"it was written by {saved_world} process(es), this run has {world}"
    if saved_engine == DEEPSPEED == engine and saved_world != world:
        return (
            f"{moved}. DeepSpeed ZeRO checkpoints are partitioned per rank, and sftlab does not convert them to "
            "DeepSpeed's universal checkpoint (ds_to_universal) for another world size; launch it with "
            f"{saved_world} processes, or start a new output_dir"
        )
    if saved_engine == FSDP and engine != FSDP and saved_world != world:
        return (
            f"{moved}. Its FSDP shards (torch distributed checkpoint) are read by an FSDP run on any number of "
            "processes >= 2, not by a run without FSDP; launch it with the FSDP accelerate config on >= 2 "
            f"processes (e.g. {saved_world})"
        )
    if saved_engine != engine and not {saved_engine, engine} <= {SINGLE, DDP}:
        return f"it was written under {saved_engine}, this run uses {engine}; launch it with the same accelerate config"
    return None


class Engine:
    """The engine a run is spread over, made once from its Accelerator (`Engine.of`; kept as `Components.engine`).
    Everything that differs between engines is a method or attribute here; callers never ask which one it
    is. This base class is one process; `DDPEngine`, `FSDPEngine` and `DeepSpeedEngine` override it."""

    name = SINGLE
    sharded = False  # FSDP/DeepSpeed: they shard the weights (kept fp32, cast by the engine), forwards are collective
    lockstep_forwards = (
        False  # evaluation runs the same number of batches on every rank (collective forwards)
    )

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    @staticmethod
    def of(accelerator: Accelerator) -> Engine:
        kind = accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return FSDPEngine(accelerator)
        if kind == DistributedType.DEEPSPEED:
            return DeepSpeedEngine(accelerator)
        return DDPEngine(accelerator) if accelerator.num_processes > 1 else Engine(accelerator)

    # --- before the model is built
    def check_run_settings(self, cfg) -> None:
        """Settings an engine cannot honour fail before any weights are loaded (EngineError)."""

    def precision(self, mixed: str) -> tuple[str, str] | None:
        """(compute, masters) for the precision line where the engine casts the weights itself, else None."""
        return None

    @contextmanager
    def unpartitioned_loading(self):
        """Within: the model is loaded whole (only DeepSpeed ZeRO-3 would partition it while loading)."""
        yield

    def target_loss_head_supported(self) -> tuple[bool, str]:
        """Whether the target-only loss head may read the output projection's weight outside its forward."""
        return True, ""

    def prepare(self, model: torch.nn.Module, optimizer, cfg) -> tuple[Any, Any]:
        """Wrap the model and optimizer for this engine (Accelerate's `prepare`); returns them wrapped."""
        return self.accelerator.prepare(model, optimizer)

    # --- the optimizer step
    def accumulating(self, model, sync: bool):
        """The context of one micro-batch's forward/backward: without the gradient all-reduce unless `sync`."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor, boundary: bool) -> None:
        """Back-propagate one micro-batch's loss; `boundary`: the last micro-batch of the optimizer step."""
        self.accelerator.backward(loss)

    def step_gradients(self, model, loss_finite: bool, clip) -> float:
        """The gradient norm before clipping; `clip()` clips and returns it (sftlab clips: trainer/loop.py)."""
        return clip()

    def optimizer_step(self, optimizer) -> None:
        """Update the weights (once the loss and gradient norm are known finite)."""
        optimizer.step()

    # --- the model, unwrapped or gathered
    def unwrap(self, model):
        """The model without the engine's wrapper (DDP, DeepSpeed); a compiled one stays compiled."""
        return self.accelerator.unwrap_model(model)

    def bare_model(self, model):
        """The model as built, without the engine's wrapper and then without torch.compile's:
        `unwrap_model(..., keep_torch_compile=False)` drops the compile wrapper only when it is the outermost
        one, and a run compiles its model before `prepare` wraps it (DDP(compiled))."""
        return self.accelerator.unwrap_model(self.accelerator.unwrap_model(model), keep_torch_compile=False)

    def gathered_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Sharded engines: the whole model's state dict gathered from the shards (a collective call: every
        rank calls it; the main process gets the full tensors). None where every rank holds the whole model."""
        return None

    # --- checkpoints
    def trainable_only_checkpoints(self, adapters: bool) -> bool:
        """Adapters keep only their trainable tensors in a checkpoint (sharded engines save whole shards)."""
        return adapters

    def load_weights(self, ckpt: Path, scheduler, optimizer, trainable_only: bool) -> None:
        """The weights (and fp32 masters) of `ckpt` back in the prepared model, nothing else that matters after."""
        checkpoint.load_weights(self.accelerator, ckpt, optimizer, trainable_only=trainable_only)

    def leave_together(self) -> None:
        """At the end of a multi-process run every rank waits for the main one (still saving the model) and
        the process group is taken down before the interpreter exits: a rank exiting alone with the group
        alive was seen to abort in DeepSpeed/gloo's threads ("terminate called without an active exception")."""
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
            # gloo's worker threads drop the last collectives' tensors after the callers have returned, and
            # their Python objects need the GIL. The group's destructor (when the DDP reducer or the
            # group is freed, holding the GIL) joins those threads: if one still waits for the GIL, both
            # wait forever (seen at the end of 2-process runs, in gdb: ~ProcessGroupGloo joining a
            # runloop blocked in a tensor's decref). Sleeping lets them finish first (the GIL is free).
            time.sleep(0.5)
            self.accelerator.state.destroy_process_group()


class DDPEngine(Engine):
    """Several processes, each with the whole model; DDP all-reduces the gradients."""

    name = DDP


class ShardedEngine(Engine):
    """FSDP and DeepSpeed: the weights are sharded over the ranks, forwards and gathering are collective."""

    sharded = True
    lockstep_forwards = True

    def check_run_settings(self, cfg) -> None:
        if cfg.train.compile is True:
            raise EngineError(f"train.compile is not supported with {self.name} in sftlab; turn it off")
        if cfg.peft is not None and cfg.peft.quantize:
            raise EngineError(
                f"QLoRA (peft.quantize) is not supported with {self.name} in sftlab; use LoRA or one process"
            )

    def precision(self, mixed: str) -> tuple[str, str]:
        """The engine casts; the weights it shards stay fp32."""
        if mixed == "no":
            return "float32", ""
        return f"{mixed} compute by {self.name}'s mixed precision", "; fp32 sharded master weights"

    def gathered_state_dict(self, model) -> dict[str, torch.Tensor]:
        state = self.accelerator.get_state_dict(model)
        if state is None:  # ZeRO-3 gathers onto the main process only
            return {}
        names: dict[
            int, list[str]
        ] = {}  # tied parameters (embeddings = output head) are saved once, as transformers does
        for name, param in self.accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        tied = {n for group in names.values() for n in group[1:]}
        return {k: v.detach().to("cpu") for k, v in state.items() if k not in tied}

    def trainable_only_checkpoints(self, adapters: bool) -> bool:
        return False

    def load_weights(self, ckpt: Path, scheduler, optimizer, trainable_only: bool) -> None:
        """The weights are engine shards: read as a resume does (optimizer, scheduler and RNG too)."""
        checkpoint.load_checkpoint(self.accelerator, ckpt, scheduler, trainable_only=trainable_only)


class FSDPEngine(ShardedEngine):
    name = FSDP

    def prepare(self, model: torch.nn.Module, optimizer, cfg) -> tuple[Any, Any]:
        self._fit_wrap_classes(model)
        return super().prepare(model, optimizer, cfg)

    def _fit_wrap_classes(self, model: torch.nn.Module) -> None:
        """FSDP's units: the model's `_no_split_modules` classes that it actually holds. transformers collects
        that list from the model's sub-models' classes, and Accelerate refuses a class it cannot find: LLaVA's
        CLIP vision tower lists CLIPTextEmbeddings (of CLIP's text model, absent). A class the recipe names
        (fsdp_transformer_layer_cls_to_wrap) is kept as the user wrote it."""
        plugin = self.accelerator.state.fsdp_plugin
        if plugin.transformer_cls_names_to_wrap is not None:
            return
        present = {type(m).__name__ for m in model.modules()}
        listed = transformers_compat.no_split_modules(model)
        if set(listed) - present:  # else Accelerate's own reading of the list is left as it is
            plugin.transformer_cls_names_to_wrap = sorted(n for n in listed if n in present)


class DeepSpeedEngine(ShardedEngine):
    """DeepSpeed ZeRO steps inside its engine: sftlab marks the accumulation boundary itself, backpropagates
    without DeepSpeed's 1/GAS scaling, and `engine.step()` clips (to the max_grad_norm written into its config)."""

    name = DEEPSPEED

    @property
    def zero_stage(self) -> int:
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    def check_run_settings(self, cfg) -> None:
        if cfg.train.on_nan == "skip_step":
            raise EngineError(
                "train.on_nan=skip_step: DeepSpeed updates inside its engine and cannot skip a step; "
                "use on_nan: stop (the loss is checked before the step, the gradient norm after it)"
            )
        super().check_run_settings(cfg)

    @contextmanager
    def unpartitioned_loading(self):
        """Within: transformers loads whole weights even under a ZeRO-3 config (no `zero.Init`), so the
        model is built, wrapped and checked like any other; DeepSpeed partitions it in `prepare`."""
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def target_loss_head_supported(self) -> tuple[bool, str]:
        """ZeRO-3 keeps the output projection partitioned outside its forward (FSDP's output head group
        stays gathered after the forward)."""
        if self.zero_stage == 3:
            return False, "DeepSpeed ZeRO-3 partitions the output projection outside its forward"
        return True, ""

    def prepare(self, model: torch.nn.Module, optimizer, cfg) -> tuple[Any, Any]:
        """The DeepSpeed config filled from the run config before `prepare` (sftlab owns these values)."""
        conf = self.accelerator.state.deepspeed_plugin.deepspeed_config
        micro, max_grad_norm = cfg.train.micro_batch_size, cfg.optim.max_grad_norm
        conf["train_micro_batch_size_per_gpu"] = micro
        conf["gradient_accumulation_steps"] = 1  # sftlab marks the boundary itself
        conf["train_batch_size"] = micro * self.accelerator.num_processes
        conf["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0
        pc = self.accelerator.parallelism_config
        if (
            pc is not None and pc.sp_enabled
        ):  # Ulysses wraps the attention the model runs (sdpa, sftlab_documents)
            pc.sp_handler.sp_attn_implementation = transformers_compat.attn_implementation(model.config)
        return super().prepare(model, optimizer, cfg)

    def accumulating(self, model, sync: bool):
        return contextlib.nullcontext()  # the boundary is marked in `backward`

    def backward(self, model, loss: torch.Tensor, boundary: bool) -> None:
        model.set_gradient_accumulation_boundary(boundary)
        model.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step

    def step_gradients(self, model, loss_finite: bool, clip) -> float:
        """DeepSpeed clips and steps inside its engine (once the loss is known finite), then gives the norm."""
        if not loss_finite:
            return 0.0
        model.step()
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def optimizer_step(self, optimizer) -> None:
        pass  # done in `step_gradients`


def sharded_checkpoint_weights(ckpt: Path, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights from a sharded checkpoint, read in one process (for generate/chat/eval
    from a checkpoint directory); None when `ckpt` is not sharded. FSDP: the torch distributed checkpoint
    files, resharded into `model`'s full tensors. DeepSpeed: its fp32 master weights (`zero_to_fp32`)."""
    fsdp_dir, zero_dir = ckpt / "pytorch_model_fsdp_0", ckpt / "pytorch_model"
    if fsdp_dir.is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        dcp.load(
            state, checkpoint_id=str(fsdp_dir)
        )  # no process group: the shards, read into the model's tensors
        return state["model"]
    if zero_dir.is_dir():
        _quiet_deepspeed_on_cpu()
        try:
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )
        except ImportError:
            raise EngineError(
                f"{ckpt} is a DeepSpeed checkpoint: reading it needs `pip install deepspeed`"
            ) from None
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=zero_dir.name))
    return None
