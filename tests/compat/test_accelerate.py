"""compat/accelerate.py against the installed Accelerate: `AcceleratorState._reset_state`, the state writes
that turn a CPU state into an FSDP one, `Accelerator._models` (the order save_state numbers files in); and the
public replacement of `_orig_mod` (distributed.Engine.bare_model: `unwrap_model(..., keep_torch_compile=False)`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from conftest import build_model
from safetensors import safe_open
from torch import nn

from sftlab.compat import accelerate as accelerate_compat
from sftlab.trainer.distributed import Engine


@pytest.fixture()
def fresh_state():
    """A test starts from no AcceleratorState and leaves none (PartialState too where it changes it)."""
    accelerate_compat.reset_state()
    yield
    accelerate_compat.reset_state()


def test_reset_state_lets_the_next_accelerator_choose_another_precision(fresh_state):
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="bf16")
    accelerate_compat.reset_state(reset_partial_state=False)
    assert PartialState().initialized  # the processes' state is kept
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"


def test_force_fsdp_makes_the_state_an_fsdp_one(fresh_state):
    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin()
    try:
        accelerate_compat.force_fsdp(accelerator, plugin)
        assert accelerator.distributed_type == DistributedType.FSDP
        assert accelerator.state.fsdp_plugin is plugin and accelerator.is_fsdp2 == (plugin.fsdp_version == 2)
        assert PartialState().distributed_type == DistributedType.FSDP
    finally:
        accelerate_compat.reset_state(reset_partial_state=True)


def test_prepared_models_are_what_save_state_numbers(fresh_state, tmp_path):
    accelerator = Accelerator(cpu=True)
    first, second = accelerator.prepare(build_model(64, seed=0), nn.Linear(3, 2))
    assert accelerate_compat.prepared_models(accelerator) == [first, second]
    assert all(a is b for a, b in zip(accelerate_compat.prepared_models(accelerator), [first, second]))
    accelerator.save_state(str(tmp_path), safe_serialization=True)
    for i, model in enumerate(accelerate_compat.prepared_models(accelerator)):
        with safe_open(
            str(tmp_path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")), "pt"
        ) as f:
            saved = set(f.keys())
        assert saved <= set(model.state_dict()) and saved >= {n for n, _ in model.named_parameters()} - {
            "lm_head.weight"
        }  # a tied head is stored once


def test_bare_model_strips_the_compile_wrapper_under_ddp_too(fresh_state, tmp_path):
    """The public replacement of `getattr(model, "_orig_mod", model)`: a run compiles before `prepare`
    wraps, so DDP holds the compiled module; `unwrap_model(..., keep_torch_compile=False)` alone drops the
    compile wrapper only when it is outermost."""
    if dist.is_initialized():
        pytest.skip("a process group is already open in this process")
    accelerator, module = Accelerator(cpu=True), nn.Linear(2, 2)
    bare_model = Engine.of(accelerator).bare_model
    compiled = torch.compile(module)
    assert bare_model(module) is module
    assert bare_model(compiled) is module
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert bare_model(nn.parallel.DistributedDataParallel(compiled)) is module
        assert bare_model(nn.parallel.DistributedDataParallel(module)) is module
    finally:
        dist.destroy_process_group()
