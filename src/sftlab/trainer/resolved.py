"""What a run fixed before its first step (`Resolved`): its config, output directory, resume point and
processes, every `auto` decision with its reason, and the run's geometry (`batch_geometry`, `plan_steps`).

`start_run` (trainer/start.py) starts it with what is fixed before any data is read (the config as the
run trains it, the output directory, the resume point, the mixed precision, the engine and its
processes); the recipe (trainer/loop.py) adds the data's fingerprint, and `build_components`
(trainer/setup.py) completes it, once, when the model, the stream and the compile decision are known
(`dataclasses.replace`: the record is frozen). Nothing changes it after setup; run.json is written from
it (trainer/outputs.py: run_info).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.config.schema import ConfigError, SFTConfig
from sftlab.trainer.checkpoint import TrainerState
from sftlab.trainer.inputs import RunInputs


@dataclass(frozen=True)
class Resolved:
    """The settings, decisions and sizes a run trains with; each decision's reason is its `*_why`."""

    cfg: SFTConfig  # as the run trains it: model.dtype auto resolved, a continued adapter's peft section
    output_dir: Path  # train.output_dir
    inputs: RunInputs  # what the Python API passed (run.json records their description)
    mixed_precision: str  # what Accelerate runs: no | bf16 | fp16 (trainer/precision.py)
    mixed_precision_why: str
    engine: str  # single | ddp | fsdp | deepspeed (trainer/distributed.py)
    world_size: int  # processes the run is spread over
    main: bool = True  # this is the main process (it writes the run's files, prints, runs the callbacks)
    resume_from: Path | None = None  # the checkpoint the run continues (None: it starts)
    resume_state: TrainerState | None = None  # that checkpoint's trainer state, read once
    resume_command: str = ""  # printed when a signal or a callback stops the run
    model_path: str | None = None  # the base model's path when resolving model.dtype: auto needed it
    data_fingerprint: str | None = None  # the training units' (trainer/resume.py), when a checkpoint needs it
    weight_form: str = "none"  # bf16 copies of fp32 masters: none | matmul | all (precision.bf16_weight_form)
    weight_form_why: str = ""
    recompute: bool = False  # activations recomputed in the backward (train.gradient_checkpointing)
    recompute_why: str = ""
    compiled: bool = False  # train.compile (trainer/compiling.py)
    compile_why: str = ""
    compile_key: str = ""  # this machine and model shape, for the compile-time records ("" = not recorded)
    packed_attention: str | None = None  # documents | mask, for packed rows (model/attention.py); else None
    packed_attention_why: str | None = None
    sequence_parallel_why: str | None = (
        None  # the backend of train.sequence_parallel > 1 (sequence_parallel.py)
    )
    micro_batch_size: int = 0  # rows per micro-batch per process (train.micro_batch_size)
    micro_batch_tokens: int | None = None  # the token budget per micro-batch per process, if one is set
    grad_accum_steps: int = 1
    global_batch_size: int = 0  # one optimizer step over all processes: rows, or tokens with a token budget
    global_batch_unit: str = "rows"  # rows | tokens
    tokens_per_step: int = 0  # padded tokens of one optimizer step of fixed-size rows (all processes)
    total_steps: int = 0  # optimizer steps of the run
    total_micro_batches: int = 0  # micro-batches of the run (each over all processes)
    peak_flops: float | None = None  # per process: train.peak_flops or the matmul probe
    peak_flops_why: str = ""  # where the peak comes from (the probe's dtype and shape, or the key)

    @property
    def start_step(self) -> int:
        """The optimizer steps done before this process started: the resume point's, else 0."""
        return self.resume_state.step if self.resume_state is not None else 0

    def reasons(self) -> dict[str, str]:
        """Each decision's reason, by the run.json key of the decision."""
        why = {
            "mixed_precision": self.mixed_precision_why,
            "weight_form": self.weight_form_why,
            "gradient_checkpointing": self.recompute_why,
            "compile": self.compile_why,
        }
        if self.packed_attention is not None:
            why["packed_attention"] = self.packed_attention_why or ""
        if self.sequence_parallel_why is not None:
            why["sequence_parallel"] = self.sequence_parallel_why
        if self.peak_flops_why:
            why["peak_flops"] = self.peak_flops_why
        return why


def with_global_batch(cfg: SFTConfig, world_size: int) -> tuple[SFTConfig, str | None]:
    """`train.global_batch_size` (examples, or packed rows, per optimizer step over all processes) turned
    into `train.grad_accum_steps` for this world size, with the line that says so; refused when
    micro_batch_size x processes does not divide it, naming the sizes that would."""
    train = cfg.train
    wanted = train.global_batch_size
    if wanted is None:
        return cfg, None
    per_micro = train.micro_batch_size * world_size
    if wanted % per_micro:
        near = sorted(
            {max(per_micro, wanted // per_micro * per_micro), (wanted // per_micro + 1) * per_micro}
        )
        divisors = [m for m in range(1, train.micro_batch_size + 1) if wanted % (m * world_size) == 0]
        raise ConfigError(
            f"train.global_batch_size ({wanted}) is not a multiple of train.micro_batch_size "
            f"({train.micro_batch_size}) x {world_size} process(es) = {per_micro}: use "
            f"{' or '.join(map(str, near))}"
            + (f", or train.micro_batch_size {divisors[-1]}" if divisors else "")
        )
    accum = wanted // per_micro
    line = (
        f"[bold]train.global_batch_size[/bold]: {wanted} = micro_batch_size {train.micro_batch_size} x "
        f"grad_accum_steps {accum} x {world_size} process(es)"
    )
    if "grad_accum_steps" in train.model_fields_set and train.grad_accum_steps != accum:
        line += f" (train.grad_accum_steps {train.grad_accum_steps} is replaced: global_batch_size wins)"
    return cfg.model_copy(update={"train": train.model_copy(update={"grad_accum_steps": accum})}), line


def batch_geometry(cfg: SFTConfig, world_size: int) -> dict[str, Any]:
    """One optimizer step's size, for `Resolved`: per process, over all processes (rows, or tokens with a
    token budget), and its padded tokens with fixed-size rows."""
    train = cfg.train
    budget = train.micro_batch_tokens
    per_micro_batch = budget if budget is not None else train.micro_batch_size
    return {
        "micro_batch_size": train.micro_batch_size,
        "micro_batch_tokens": budget,
        "grad_accum_steps": train.grad_accum_steps,
        "global_batch_size": per_micro_batch * train.grad_accum_steps * world_size,
        "global_batch_unit": "tokens" if budget is not None else "rows",
        "tokens_per_step": train.grad_accum_steps
        * train.micro_batch_size
        * world_size
        * cfg.data.max_seq_length,
    }


def plan_steps(cfg: SFTConfig, batches_per_epoch: int) -> dict[str, int]:
    """The run's length, for `Resolved`: optimizer steps and micro-batches (max_steps wins over num_epochs).

    A step takes grad_accum_steps micro-batches or the rest of its epoch (never two epochs' examples:
    data/collate.py MicroBatchStream), so an epoch is ceil(batches_per_epoch / accum) steps: with
    fixed-size micro-batches ceil(examples / global batch), the same on any world size."""
    accum = cfg.train.grad_accum_steps
    per_epoch = math.ceil(batches_per_epoch / accum)
    if cfg.train.max_steps is not None:
        steps = cfg.train.max_steps
    else:
        steps = math.ceil(cfg.train.num_epochs * per_epoch)
    epochs, rest = divmod(steps, per_epoch)
    return {
        "total_steps": steps,
        "total_micro_batches": epochs * batches_per_epoch + min(rest * accum, batches_per_epoch),
    }
