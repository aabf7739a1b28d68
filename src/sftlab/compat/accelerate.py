"""Accelerate's private API as sftlab uses it (accelerate 1.15.0)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def reset_state(reset_partial_state: bool = False) -> None:
    """Forget the process-wide AcceleratorState (mixed precision, engine, plugins), so that the next
    `Accelerator(...)` builds a new one; `reset_partial_state` also forgets the PartialState (processes and
    device). Without it a second Accelerator of another mixed precision in one process raises ValueError.

    Touches: `AcceleratorState._reset_state` (documented "used internally and should not be called").
    Written against accelerate 1.15.0. Public alternative: none (a new process)."""
    AcceleratorState._reset_state(reset_partial_state=reset_partial_state)


def force_fsdp(accelerator: Accelerator, plugin: Any) -> None:
    """Make the initialised state of `accelerator` an FSDP one with `plugin` (a FullyShardedDataParallelPlugin):
    the assignments AcceleratorState's __init__ makes when it chooses FSDP, which it does on accelerator
    devices only (multi-CPU states stay DDP). Nothing in the Accelerator reads them before `prepare`.

    Touches: writes to `AcceleratorState.fsdp_plugin` and `.distributed_type` (set by its __init__ only) and
    to `PartialState._shared_state["distributed_type"]` (the process-wide dict behind every PartialState;
    AcceleratorState's __init__ writes the same key). Written against accelerate 1.15.0.
    Public alternative: none (`Accelerator(fsdp_plugin=...)` on CPU processes runs DDP)."""
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepared_models(accelerator: Accelerator) -> list[Any]:
    """The models `accelerator.prepare` returned, in order: the order `save_state` numbers their files in
    (model.safetensors, model_1.safetensors, ...) and `load_state` reads them back.

    Touches: `Accelerator._models`. Written against accelerate 1.15.0.
    Public alternative: the `models` list handed to `register_save_state_pre_hook` /
    `register_load_state_pre_hook` hooks (only inside save_state / load_state), or the caller's own list
    of what it prepared."""
    return accelerator._models
