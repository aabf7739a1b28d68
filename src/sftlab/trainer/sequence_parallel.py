"""Sequence parallelism (`train.sequence_parallel: N`): the settings refused before anything loads, the
Accelerate `ParallelismConfig` that turns the library's engine on, and the split of a micro-batch.

sftlab runs no engine of its own. With `sequence_parallel_backend: deepspeed` (what `auto` picks under a
DeepSpeed launch) Accelerate's `prepare` registers DeepSpeed's Ulysses attention (ALST) with transformers:
each process holds 1/N of every sequence, and inside each attention call an all-to-all hands every process
the whole sequence for 1/N of the heads (the position ids are gathered with it, so per-document attention,
sftlab's `sftlab_documents` or flash-attention's varlen path, stays exact for packed rows). DeepSpeed then
reduces the gradients over all processes and divides by the data-parallel size (processes / N).

What sftlab does around it (this module):

- the ranks of one group (consecutive ranks, as DeepSpeed forms them) train on the same micro-batch:
  the stream's micro-batch is split over the data-parallel ranks (`data_position`), not all ranks;
- `shard`: the labels are shifted BEFORE the split (`shift_labels`: the target of each position, so the
  last position of a shard keeps its target, the first token of the next shard); rows are padded to
  micro_batch_size (Ulysses checks the shape) and the length to a multiple of N; position ids are added
  (0.. per row) where the collate gave none; the padding mask is dropped (the attention is causal, by
  position ids, and rows are right-padded, so padding never precedes a real token);
- the target-only loss head (model/loss.py) runs on each shard's `shift_labels`; the step's normaliser is
  the sum over all ranks of each shard's targets, which counts every target of the step once;
- the loss each rank back-propagates is scaled by the data-parallel size (`gradient_world`), the number
  DeepSpeed divides the summed gradients by.

Evaluation and generation run in eval mode, where Accelerate has Ulysses step aside (`disable_in_eval`):
every rank evaluates its own whole rows, as without sequence parallelism.

torch context parallel (`backend: torch`) needs CUDA: Accelerate accepts a `cp_size` only under FSDP2,
which it enables on accelerator devices only, and torch's ring attention has sharding rules only for the
CUDA SDPA kernels (flash, memory-efficient, cuDNN), none for the CPU one
(`aten._scaled_dot_product_flash_attention_for_cpu`); it is also causal-only (no per-document attention).
sftlab refuses it, saying what would work (docs/distributed.md).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sftlab.config.schema import SFTConfig
from sftlab.data.types import IGNORE_INDEX
from sftlab.errors import SftlabError
from sftlab.trainer import distributed

ULYSSES, CONTEXT_PARALLEL = "deepspeed", "torch"  # the values of train.sequence_parallel_backend


class SequenceParallelError(SftlabError, ValueError):
    """A `train.sequence_parallel` setting that cannot run with this launch, device or config."""


def choose_backend(cfg: SFTConfig, world: int, deepspeed: bool, cuda: bool) -> tuple[str, str]:
    """(backend, why) for `train.sequence_parallel` > 1 under this launch (`deepspeed`: it runs DeepSpeed,
    trainer/distributed.py: `launch_provides_ulysses`); SequenceParallelError where none can run, with what
    would."""
    train, n = cfg.train, cfg.train.sequence_parallel
    asked = train.sequence_parallel_backend
    if world % n:
        raise SequenceParallelError(
            f"train.sequence_parallel: {n} must divide the number of processes ({world}): launch a multiple "
            f"of {n} processes (accelerate launch --num_processes), or set train.sequence_parallel to a divisor"
        )
    if asked == CONTEXT_PARALLEL or (asked == "auto" and not deepspeed):
        raise SequenceParallelError(_torch_refusal(asked, cuda))
    if not deepspeed:
        raise SequenceParallelError(
            "train.sequence_parallel_backend: deepspeed needs a DeepSpeed launch: accelerate launch "
            "--config_file configs/accelerate/deepspeed_zero2.yaml (or zero3)"
        )
    why = "as configured" if asked == ULYSSES else "auto: the launch runs DeepSpeed (Ulysses)"
    return ULYSSES, why


def _torch_refusal(asked: str, cuda: bool) -> str:
    if not cuda:
        return (
            f"train.sequence_parallel_backend: {asked}: torch context parallel needs CUDA (Accelerate "
            "enables its FSDP2 only on accelerator devices, and torch's ring attention has no rule for the CPU "
            "SDPA kernel); on CPU processes use DeepSpeed Ulysses: accelerate launch --config_file "
            "configs/accelerate/deepspeed_zero2.yaml with train.sequence_parallel_backend: deepspeed (or auto)"
        )
    return (
        f"train.sequence_parallel_backend: {asked}: torch context parallel is not wired into sftlab yet "
        "(its ring attention is causal-only, no per-document attention for packed rows); use DeepSpeed "
        "Ulysses: accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml"
    )


def check_settings(cfg: SFTConfig) -> None:
    """Run settings that cannot be kept exact under the split (SequenceParallelError, before anything loads)."""
    train, n = cfg.train, cfg.train.sequence_parallel
    if train.loss_normalization != "tokens":
        raise SequenceParallelError(
            f"train.loss_normalization: {train.loss_normalization} weighs targets by the count of their "
            "micro-batch or sequence, which one shard does not see; with train.sequence_parallel use tokens"
        )
    if train.micro_batch_tokens is not None:
        raise SequenceParallelError(
            "train.micro_batch_tokens varies the rows of a micro-batch, and Ulysses fixes them: with "
            "train.sequence_parallel set train.micro_batch_size instead"
        )
    packed = cfg.data.packing != "none"
    if packed and train.packed_attention in ("mask", "flex"):
        raise SequenceParallelError(
            f"train.packed_attention: {train.packed_attention}: its document mask is built per shard and "
            "Ulysses drops it; with train.sequence_parallel use documents or auto (documents apart by "
            "position ids)"
        )
    if cfg.model.attn_implementation == "eager":
        raise SequenceParallelError(
            "model.attn_implementation: eager cannot run under Ulysses sequence parallelism (it needs a dense "
            f"mask); with train.sequence_parallel: {n} use sdpa or flash_attention_2"
        )


def plan(cfg: SFTConfig, cuda: bool) -> tuple[dict[str, Any], str | None]:
    """The Accelerator's keyword arguments for this run's sequence parallelism ({} when off) and the reason
    for the backend (None when off). Reads the launch from the environment `accelerate launch` sets."""
    n = cfg.train.sequence_parallel
    if n == 1:
        return {}, None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend, why = choose_backend(cfg, world, distributed.launch_provides_ulysses(), cuda)
    check_settings(cfg)
    from accelerate.parallelism_config import ParallelismConfig

    return {"parallelism_config": ParallelismConfig(sp_backend=backend, sp_size=n)}, why


def size(accelerator: Accelerator) -> int:
    """Processes per sequence (1: no sequence parallelism)."""
    pc = accelerator.parallelism_config
    return pc.sp_size if pc is not None and pc.sp_enabled else 1


def data_position(accelerator: Accelerator) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world): a group's consecutive ranks share one rank here."""
    n = size(accelerator)
    return accelerator.process_index // n, accelerator.num_processes // n


def gradient_world(accelerator: Accelerator) -> int:
    """What the engine divides the summed gradients by: the data-parallel world (all processes without
    sequence parallelism; DeepSpeed divides by processes / N under Ulysses)."""
    return data_position(accelerator)[1]


def shard(batch: dict[str, torch.Tensor], accelerator: Accelerator, rows: int) -> dict[str, torch.Tensor]:
    """This rank's shard of a whole micro-batch (see the module docstring); the batch itself when off."""
    n = size(accelerator)
    if n == 1:
        return batch
    labels = batch["labels"]
    b, t = labels.shape
    if b > rows:
        raise SequenceParallelError(f"a micro-batch of {b} rows under sequence parallelism sized for {rows}")
    padded_t = -(-t // n) * n
    out: dict[str, torch.Tensor] = {}
    if "position_ids" not in batch:
        out["position_ids"] = torch.arange(t).expand(b, t)
    for key, value in batch.items():
        if key in ("labels", "attention_mask"):
            continue
        if value.dim() < 2 or value.shape[:2] != (b, t):
            raise SequenceParallelError(
                f"the batch's {key!r} {tuple(value.shape)} is not laid out by token ({b} x {t}): sequence "
                "parallelism splits text batches only (no vision rows, no grouped rows)"
            )
        out[key] = value
    out["shift_labels"] = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    chunk, k = padded_t // n, accelerator.process_index % n
    for key, value in out.items():
        if key == "position_ids":  # padding continues each row's positions (never a document start)
            tail = value[:, -1:] + torch.arange(1, padded_t - t + 1)
            value = torch.cat([value, tail], dim=1)
            value = torch.cat([value, torch.arange(padded_t).expand(rows - b, padded_t)], dim=0)
        else:
            fill = IGNORE_INDEX if key == "shift_labels" else 0
            value = F.pad(value, (0, 0) * (value.dim() - 2) + (0, padded_t - t), value=fill)
            value = F.pad(value, (0, 0) * (value.dim() - 1) + (0, rows - b), value=fill)
        out[key] = value[:, k * chunk : (k + 1) * chunk].contiguous()
    return out
