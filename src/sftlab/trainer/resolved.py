"""What a run resolved before its first step (`Resolved`): every `auto` decision with its reason, and the
run's geometry.

`setup_run` (trainer/setup.py) starts it with what Accelerate must know first (the mixed precision, the
engine and its processes); `setup_model_and_optimizer` completes it, once, when the model, the stream and
the compile decision are known (`dataclasses.replace`: the record is frozen). Nothing changes it after
setup; run.json is written from it (trainer/outputs.py: run_info).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resolved:
    """The decisions and sizes a run trains with; each decision's reason is its `*_why`."""

    mixed_precision: str  # what Accelerate runs: no | bf16 | fp16 (trainer/precision.py)
    mixed_precision_why: str
    engine: str  # single | ddp | fsdp | deepspeed (trainer/distributed.py)
    world_size: int  # processes the run is spread over
    weight_form: str = "none"  # bf16 copies of fp32 masters: none | matmul | all (precision.bf16_weight_form)
    weight_form_why: str = ""
    recompute: bool = False  # activations recomputed in the backward (train.gradient_checkpointing)
    recompute_why: str = ""
    compiled: bool = False  # train.compile (trainer/compiling.py)
    compile_why: str = ""
    compile_key: str = ""  # this machine and model shape, for the compile-time records ("" = not recorded)
    packed_attention: str | None = None  # documents | mask, for packed rows (model/attention.py); else None
    packed_attention_why: str | None = None
    micro_batch_size: int = 0  # rows per micro-batch per process (train.micro_batch_size)
    micro_batch_tokens: int | None = None  # the token budget per micro-batch per process, if one is set
    grad_accum_steps: int = 1
    global_batch: int = 0  # one optimizer step over all processes: rows, or tokens with a token budget
    global_batch_unit: str = "rows"  # rows | tokens
    tokens_per_step: int = 0  # padded tokens of one optimizer step of fixed-size rows (all ranks)
    total_steps: int = 0  # optimizer steps of the run
    total_micro: int = 0  # micro-batches of the run
    peak_flops: float | None = None  # per process: train.peak_flops or the matmul probe

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
        return why
