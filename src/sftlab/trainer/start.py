"""Starting a run, before any data is read: what is fixed first, as the first part of its `Resolved`.

`start_run` settles the model settings (trainer/run_model.py: `model.dtype: auto`, a continued adapter),
the mixed precision (trainer/precision.py), fails fast on what needs nothing loaded (`check_before_start`:
trackers, local data paths, Hub access for push_to_hub), builds Accelerate and its `Engine`
(trainer/distributed.py), claims `train.output_dir` and finds the resume point (trainer/resume.py), and
seeds the run. It returns the run's `Resolved` (trainer/resolved.py) with its engine, or None when
train.resume=auto finds the run already finished.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console

from sftlab.config.schema import ConfigError, SFTConfig
from sftlab.data.locate import check_local_paths
from sftlab.trainer import (
    allocator,
    distributed,
    hub,
    precision,
    resume,
    run_model,
    sequence_parallel,
    tracking,
)
from sftlab.trainer import data as run_data
from sftlab.trainer import resolved as resolved_module
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.rundir import RunError


def start_run(
    cfg: SFTConfig, console: Console, resume_command: str | None = None, inputs: RunInputs | None = None
) -> tuple[resolved_module.Resolved, distributed.Engine] | None:
    """Accelerate and its engine, mixed precision, the output directory and the resume point; None when
    train.resume=auto finds the run already finished."""
    inputs = inputs or RunInputs()
    cfg, model_path = run_model.resolve_model_settings(cfg, inputs, console)
    mixed, why = precision.run_precision(cfg)
    out = Path(cfg.train.output_dir)
    check_before_start(cfg, inputs)
    # sequence parallelism: refused here where it cannot run; else the Accelerator's ParallelismConfig
    parallelism, sp_why = sequence_parallel.plan(cfg, cuda=torch.cuda.is_available())
    # the processes and their engine (nothing is written yet): the output_dir verdict is shared over them
    engine = start_engine(cfg, mixed, out, **parallelism)
    if resume.claim_output_dir(cfg, console, engine.accelerator) == "complete":
        return None
    tracking.prepare_offline(cfg.train.report_to, out)
    main = engine.accelerator.is_main_process
    data_world = sequence_parallel.data_position(engine.accelerator)[1]  # processes / train.sequence_parallel
    cfg, batch_line = resolved_module.with_global_batch(cfg, data_world)
    cfg = run_data.with_resolved_length(cfg, inputs, model_path, console if main else None)
    world = engine.accelerator.num_processes
    cfg, resume_from, resume_state, resume_line = resume.resume_point(cfg, data_world)
    if main:
        precision.print_precision(cfg, console, mixed, why, engine.precision(mixed))
        console.print("[bold]allocator[/bold]: {} ({})".format(*allocator.describe()), highlight=False)
        for line in (batch_line, resume_line):
            if line:
                console.print(line, highlight=False)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    resolved = resolved_module.Resolved(
        cfg=cfg,
        output_dir=out,
        inputs=inputs,
        mixed_precision=mixed,
        mixed_precision_why=why,
        engine=engine.name,
        world_size=world,
        main=main,
        resume_from=resume_from,
        resume_state=resume_state,
        resume_command=resume_command or f"sftlab train <config> train.resume=auto train.output_dir={out}",
        model_path=model_path,
        sequence_parallel_why=sp_why,
    )
    return resolved, engine


def check_before_start(cfg: SFTConfig, inputs: RunInputs) -> None:
    """What fails fast, before anything is touched: trackers, local data paths, Hub access for push_to_hub,
    a loss normalisation asked of an objective that has its own."""
    if inputs.objective is not None and cfg.train.loss_normalization != "tokens":
        raise ConfigError(
            f"train.loss_normalization: {cfg.train.loss_normalization} is the SFT objective's; the objective "
            "given (objective=) normalises its own loss: leave train.loss_normalization at tokens"
        )
    try:
        tracking.check_trackers(cfg.train.report_to)
    except tracking.TrackerError as e:
        raise RunError(str(e)) from None
    check_local_paths(cfg.data.train + cfg.data.eval)  # a mistyped data path fails before anything is touched
    if cfg.train.push_to_hub:  # no token or no Hub: one error now, not after training
        hub.check_access(cfg.train.hub_model_id)


def start_engine(cfg: SFTConfig, mixed: str, out: Path, **parallelism) -> distributed.Engine:
    """The run's Accelerator (with its trackers' settings and `parallelism`: sequence_parallel.plan) and the
    engine it runs; settings the engine cannot honour fail here, before any weights load."""
    trackers = cfg.train.report_to
    accelerator = distributed.build_accelerator(
        mixed,
        cpu=precision.run_device_type() == "cpu",
        dist_timeout=cfg.train.dist_timeout,
        log_with=trackers or None,
        project_dir=str(out / "tensorboard") if "tensorboard" in trackers else None,
        **parallelism,
    )
    engine = distributed.Engine.of(accelerator)
    try:
        engine.check_run_settings(cfg)
        distributed.check_ranks_agree(accelerator, run_facts(cfg))
    except (distributed.EngineError, distributed.RankMismatch) as e:
        raise RunError(str(e)) from None
    return engine


def run_facts(cfg: SFTConfig) -> dict[str, str]:
    """What every process of a run must share: the config (its hash), the versions that compute, the layout."""
    import hashlib
    import importlib.metadata as metadata
    import json
    import os

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    config = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str)
    return {
        "config": hashlib.sha256(config.encode()).hexdigest()[:16],
        **{f"{name} version": version(name) for name in ("sftlab", "torch", "transformers", "accelerate")},
        "world layout": f"{os.environ.get('WORLD_SIZE', '1')} processes, {os.environ.get('LOCAL_WORLD_SIZE', '?')} per node",
    }
