"""Resume on another world size or micro-batch size (trainer/resume.py): the checkpoint's global batch is
kept by adapting the accumulation (or each process's token budget), and what cannot be kept is refused
before any weights load, saying what would work. The runs themselves: tests/trainer/test_checkpoint.py
(another micro-batch size), test_distributed.py (2 -> 1 and 1 -> 2 processes), test_sharded.py (FSDP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftlab.config import SFTConfig
from sftlab.trainer.checkpoint import TrainerState
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.resume import check_resume_state, keep_global_batch, saved_stream_units
from sftlab.trainer.rundir import RunError

CKPT = Path("/runs/x/checkpoints/step-00000002")


def config(**train) -> SFTConfig:
    return SFTConfig.model_validate(
        {
            "model": {"name_or_path": "m"},
            "data": {"train": [{"path": "d.jsonl"}], "max_seq_length": 512},
            "train": train,
        }
    )


def state(cfg: SFTConfig, world: int, engine: str = "ddp") -> TrainerState:
    return TrainerState(
        2, 4, {"epoch": 0, "index": 4, "seed": 42}, world, engine, "f", [], [], cfg.model_dump()
    )


def test_the_same_geometry_changes_nothing():
    cfg = config(micro_batch_size=2, grad_accum_steps=3)
    assert keep_global_batch(cfg, state(cfg, 2), 2, CKPT) == (cfg, None)


@pytest.mark.parametrize(
    ("saved", "world", "asked", "kept"),
    [
        ((2, 3, 2), 1, 2, (2, 6)),  # 12 rows per step: 2 x 6 on one process
        ((1, 4, 1), 2, 1, (1, 2)),  # 4: 1 x 2 x 2
        ((4, 1, 2), 4, 4, (2, 1)),  # 8 over 4 processes: micro_batch_size 4 does not fit, 2 does
        ((3, 2, 1), 1, 1, (1, 6)),  # another micro-batch size on the same world size
    ],
)
def test_the_global_batch_is_kept(saved, world, asked, kept):
    micro, accum, old_world = saved
    old = config(micro_batch_size=micro, grad_accum_steps=accum)
    new, line = keep_global_batch(config(micro_batch_size=asked), state(old, old_world), world, CKPT)
    assert (new.train.micro_batch_size, new.train.grad_accum_steps) == kept
    assert f"on {world} process(es) (the checkpoint: {old_world})" in line
    assert kept[0] * kept[1] * world == micro * accum * old_world
    units = saved_stream_units(state(old, old_world))
    assert units == micro * old_world  # the stream's position moves from this micro-batch size


def test_a_world_size_that_cannot_split_the_global_batch_is_refused_naming_those_that_can():
    old = config(micro_batch_size=2, grad_accum_steps=2)  # 8 rows over 2 processes
    with pytest.raises(
        RunError,
        match=r"8 rows per step cannot be split evenly over 3 processes; world sizes that keep it: 1, 2, 4, 8",
    ):
        keep_global_batch(config(micro_batch_size=2), state(old, 2), 3, CKPT)


def test_another_global_batch_size_is_refused():
    old = config(micro_batch_size=2, grad_accum_steps=2)
    with pytest.raises(RunError, match=r"its global batch is 8 rows per step, train.global_batch_size 4"):
        keep_global_batch(config(micro_batch_size=2, global_batch_size=4), state(old, 2), 1, CKPT)


def test_token_budgets_keep_their_micro_batches():
    old = config(micro_batch_tokens=1024, grad_accum_steps=2)
    new, _ = keep_global_batch(config(micro_batch_tokens=1024), state(old, 2), 1, CKPT)
    assert (new.train.micro_batch_tokens, new.train.grad_accum_steps) == (2048, 2)
    assert saved_stream_units(state(old, 2)) is None
    with pytest.raises(RunError, match=r"cannot split evenly into budgets of at least data.max_seq_length"):
        keep_global_batch(config(micro_batch_tokens=1024), state(old, 2), 8, CKPT)  # 256 < 512


def test_micro_batch_mean_is_refused_another_cut():
    old = config(micro_batch_size=2, grad_accum_steps=2, loss_normalization="micro_batch_mean")
    new = config(micro_batch_size=2, loss_normalization="micro_batch_mean")
    with pytest.raises(RunError, match=r"micro_batch_mean averages each micro-batch's mean loss"):
        keep_global_batch(new, state(old, 2), 1, CKPT)


def resolved(saved: TrainerState, world: int, engine: str) -> Resolved:
    cfg = config()
    return Resolved(
        cfg,
        Path("/runs/x"),
        None,
        "no",
        "",
        engine,
        world,
        resume_from=CKPT,
        resume_state=saved,
        data_fingerprint="f",
    )


@pytest.mark.parametrize(
    ("saved_engine", "saved_world", "engine", "world", "refusal"),
    [
        ("ddp", 2, "single", 1, None),
        ("single", 1, "ddp", 4, None),
        ("fsdp", 2, "fsdp", 3, None),  # torch distributed checkpoint reshards
        ("fsdp", 2, "single", 1, "read by an FSDP run on any number of processes >= 2"),
        ("deepspeed", 2, "deepspeed", 4, "DeepSpeed ZeRO checkpoints are partitioned per rank"),
        ("deepspeed", 2, "ddp", 2, "written under deepspeed, this run uses ddp"),
        ("fsdp", 2, "ddp", 2, "written under fsdp, this run uses ddp"),
    ],
)
def test_engines_and_world_sizes_a_checkpoint_resumes_on(saved_engine, saved_world, engine, world, refusal):
    saved = state(config(), saved_world, saved_engine)
    if refusal is None:
        check_resume_state(resolved(saved, world, engine))
    else:
        with pytest.raises(RunError, match=refusal):
            check_resume_state(resolved(saved, world, engine))
