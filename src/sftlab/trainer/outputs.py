"""What a run writes besides checkpoints: its log files when it starts, and its model when it ends.

`open_run_log`: metrics.jsonl (rewritten from the checkpoint's records when resuming), config.yaml,
run.json (what `auto` settings resolved to; what the Python API passed), data_report.json.
`finish`: the model (fp32 masters, or gathered from a sharded engine) or the adapter saved in
`model.dtype` with the tokenizer and chat template, the match evaluation after training, the model
cards (README.md; trainer/card.py) and the FINISHED marker (train.push_to_hub uploads after it: trainer/hub.py).
`finished_result` is what a finished run reports when asked again; `export_merged` is `sftlab export --merge`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab.config.loading import dump_config
from sftlab.config.schema import MatchEvalConfig, SFTConfig
from sftlab.model import adapters
from sftlab.model.generate import MatchResult, exact_match, load_match_examples
from sftlab.model.loading import DTYPES
from sftlab.trainer import allocator, compiling, rundir
from sftlab.trainer.callbacks import CallbackList
from sftlab.trainer.card import write_model_cards
from sftlab.trainer.checkpoint import delete_checkpoints
from sftlab.trainer.components import Components
from sftlab.trainer.data import RunData, data_report_json
from sftlab.trainer.inference import load_adapter_dir, load_model_dir, model_processor
from sftlab.trainer.master_weights import load_master_weights, master_weight_optimizer
from sftlab.trainer.metrics import MetricsLog, read_metrics
from sftlab.trainer.precision import compute_dtype
from sftlab.trainer.report import DATA_REPORT
from sftlab.trainer.resolved import Resolved
from sftlab.trainer.run import TrainResult


def finished_result(out: Path) -> TrainResult:
    """What the finished run in `out` reports (its FINISHED marker and metrics.jsonl)."""
    info = rundir.read_finished(out) or {}
    history = read_metrics(out / "metrics.jsonl")
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    return TrainResult(
        output_dir=out,
        steps=info.get("steps", len(history)),
        final_loss=info.get("final_loss"),
        eval_loss=evals[-1] if evals else None,
        history=history,
        completed_before=True,
    )


def open_run_log(resolved: Resolved, parts: Components, logged_steps: list[int]) -> MetricsLog:
    """metrics.jsonl (rewritten from the checkpoint's records when resuming: its `logged_steps`),
    config.yaml, run.json; returns the metrics log."""
    out, console = resolved.output_dir, parts.console
    metrics = MetricsLog(out / "metrics.jsonl", console, enabled=resolved.main)
    if resolved.main:
        logged = set(logged_steps)
        metrics.rewrite([r for r in parts.result.history if r["step"] in logged])
        (out / "config.yaml").write_text(dump_config(resolved.cfg))
        (out / "run.json").write_text(json.dumps(run_info(resolved, parts), indent=1) + "\n")
        (out / DATA_REPORT).write_text(json.dumps(data_report_json(parts.data), indent=1) + "\n")
        console.print(
            f"[bold]train[/bold]: {resolved.total_steps} optimizer steps x {resolved.grad_accum_steps} "
            f"micro-batches of {resolved.micro_batch_size} (x{resolved.world_size} processes, "
            f"{resolved.engine}); "
            f"{parts.stream.batches_per_epoch} micro-batches/epoch"
        )
        if resolved.total_steps < 2:
            console.print(
                f"[bold yellow]warning[/bold yellow]: this run ends after {resolved.total_steps} optimizer "
                "step: the saved model has taken a single update (set train.max_steps or "
                "train.num_epochs for more)",
                highlight=False,
            )
    parts.callbacks.call("on_train_begin", run_info(resolved, parts))
    return metrics


def run_info(resolved: Resolved, parts: Components) -> dict[str, Any]:
    """What `auto` settings resolved to on this machine (also printed at start): written from
    `resolved`, each decision's reason under "reasons"."""
    head = parts.objective.loss_fn if hasattr(parts.objective, "loss_fn") else None
    weights = resolved.cfg.model.dtype
    host_allocator, host_allocator_why = allocator.describe()
    return {
        "mixed_precision": resolved.mixed_precision,
        "weights_dtype": weights,
        "compute_dtype": compute_dtype(weights, resolved.mixed_precision),
        "master_weights_fp32": master_weight_optimizer(parts.optimizer) is not None,
        "gradient_checkpointing": resolved.recompute,
        "compile": resolved.compiled,
        "loss_head": getattr(head, "mode", "full"),
        "loss_head_reason": getattr(head, "reason", ""),
        "device": str(parts.accelerator.device),
        "num_processes": resolved.world_size,
        "engine": resolved.engine,
        "peak_flops": resolved.peak_flops,
        "total_steps": resolved.total_steps,
        "inputs": resolved.inputs.describe(),
        "weight_form": resolved.weight_form,
        "packed_attention": resolved.packed_attention,
        "micro_batch_size": resolved.micro_batch_size,
        "micro_batch_tokens": resolved.micro_batch_tokens,
        "grad_accum_steps": resolved.grad_accum_steps,
        "global_batch": resolved.global_batch_size,
        "global_batch_unit": resolved.global_batch_unit,
        "total_micro_batches": resolved.total_micro_batches,
        "allocator": host_allocator,
        "reasons": {**resolved.reasons(), "allocator": host_allocator_why},
    }


def finish(resolved: Resolved, parts: Components) -> None:
    """Save the model (or adapter), run the match evaluation, end the callbacks, mark the run FINISHED."""
    cfg, out, console, result = resolved.cfg, resolved.output_dir, parts.console, parts.result
    parts.accelerator.wait_for_everyone()
    # sharded engines: every rank takes part in gathering the whole model; the main process saves it
    gathered = parts.engine.gathered_state_dict(parts.model)
    if not resolved.main:
        return
    if resolved.compile_key:  # this machine's step times, for the next run's train.compile: auto
        step_times = [r["step_time_s"] for r in result.history if r["step"] > resolved.start_step]
        compiling.update_record(resolved.compile_key, resolved.compiled, step_times, resolved.tokens_per_step)
    unwrapped = save_trained_model(cfg, out, parts, gathered)
    if cfg.match_eval is not None:
        result.match_after = run_match_eval(unwrapped, parts, cfg.match_eval, "after")
        summary = {
            "before": match_json(result.match_before),
            "after": match_json(result.match_after),
            "samples_after": [list(s) for s in result.match_after.samples[:5]],
        }
        (out / "match_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    end_callbacks(parts.callbacks, result, console)
    cards = write_model_cards(out)  # README.md, from the run's files (metrics.jsonl ends with the last step)
    console.print(f"[bold]model card[/bold]: {', '.join(str(p) for p in cards)}", highlight=False)
    rundir.mark_finished(
        out, {"steps": resolved.total_steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss}
    )
    if cfg.checkpoint.delete_at_end:
        removed = delete_checkpoints(out)
        if removed:
            console.print(
                f"[dim]deleted {removed} checkpoint(s): the run is finished (checkpoint.delete_at_end)[/dim]"
            )


def save_trained_model(cfg: SFTConfig, out: Path, parts: Components, gathered: dict | None):
    """The trained model (or adapter) saved in model.dtype with the tokenizer: from the exact fp32 masters,
    or from the tensors `gathered` from a sharded engine. Returns the model the match evaluation runs (None
    when it needs none)."""
    unwrapped = parts.engine.bare_model(parts.model)
    if cfg.peft is not None:
        # the adapter; the model users get is the fp32 base with it merged (loaded back from the saved files)
        return save_adapter_run(unwrapped, cfg, out, parts, gathered)
    tokenizer, template = saved_tokenizer(parts.data), parts.data.template
    if gathered is not None:
        dtype = DTYPES[cfg.model.dtype]
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in gathered.items()}
        save_model(unwrapped, tokenizer, out, template, state_dict=state_dict)
        parts.console.print(
            f"[bold green]saved[/bold green] model (gathered from the shards) + tokenizer to {out}"
        )
        return load_model_dir(out)[0] if cfg.match_eval is not None else None
    load_master_weights(unwrapped, parts.optimizer)  # bf16 compute copies -> fp32 weights, the exact masters
    unwrapped.to(DTYPES[cfg.model.dtype])  # saved in the dtype asked for (model.dtype)
    save_model(unwrapped, tokenizer, out, template)
    parts.console.print(f"[bold green]saved[/bold green] model + tokenizer to {out}")
    return unwrapped


def hf_model_writer(cfg: SFTConfig, parts: Components):
    """checkpoint.save_hf_model: a function writing `hf/` into a checkpoint being saved -- the model (or
    adapter) as the run's end would save it, in model.dtype with the tokenizer and chat template, from the
    exact fp32 masters, leaving the training model untouched. Sharded engines gather the weights here,
    on every rank (a collective); the function runs on the main process only."""
    gathered = parts.engine.gathered_state_dict(parts.model)
    unwrapped = parts.engine.bare_model(parts.model)
    optimizer, data = parts.optimizer, parts.data

    def write(ckpt: Path) -> None:
        state = gathered if gathered is not None else _master_state_dict(unwrapped, optimizer)
        if cfg.peft is not None:
            adapters.save_adapter(unwrapped, ckpt / "hf", adapters.base_of(cfg.model), state_dict=state)
            saved_tokenizer(data).save_pretrained(ckpt / "hf")
            return
        dtype = DTYPES[cfg.model.dtype]
        save_model(
            unwrapped,
            saved_tokenizer(data),
            ckpt / "hf",
            data.template,
            state_dict={k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in state.items()},
        )

    return write


def _master_state_dict(model, optimizer) -> dict:
    """The model's state dict with every parameter that has an fp32 master replaced by it (tied names too)."""
    state = model.state_dict()
    master = master_weight_optimizer(optimizer)
    if master is None:
        return state
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for p in model.parameters():
        try:
            value = master.master_of(p)
        except KeyError:  # frozen, not optimized
            continue
        for name in names_of.get(id(p), []):
            if name in state:
                state[name] = value
    return state


def end_callbacks(callbacks: CallbackList, result: TrainResult, console: Console) -> None:
    """on_train_end on every callback (trackers finish, the report is written), then say where the report is."""
    callbacks.call("on_train_end", result)
    report = next((cb for cb in callbacks.callbacks if getattr(cb, "name", "") == "report"), None)
    if report is not None and report.path is not None:
        console.print(f"[bold]report[/bold]: {report.path} (+ {report.path.with_name('loss.png').name})")


def save_adapter_run(model, cfg: SFTConfig, out: Path, parts: Components, gathered: dict | None = None):
    """Save the adapter (fp32 masters of the trainable weights, or their tensors `gathered` from a
    sharded engine) and the tokenizer; with peft.merge_on_save also the merged plain model under
    output_dir/merged (a fresh fp32 base and the saved adapter). Returns that merged model when the
    match evaluation needs it, else None."""
    if gathered is None:
        load_master_weights(model, parts.optimizer, frozen_too=False)  # the adapter: its exact fp32 masters
    adapters.save_adapter(model, out, adapters.base_of(cfg.model), state_dict=gathered)
    saved_tokenizer(parts.data).save_pretrained(out)
    parts.console.print(f"[bold green]saved[/bold green] adapter + tokenizer to {out}")
    if not (cfg.peft.merge_on_save or cfg.match_eval is not None):
        return None
    merged, _ = load_adapter_dir(out)
    if cfg.peft.merge_on_save:
        save_model(
            merged.to(DTYPES[cfg.model.dtype]),
            saved_tokenizer(parts.data),
            out / "merged",
            parts.data.template,
        )
        parts.console.print(f"[bold green]saved[/bold green] merged model to {out / 'merged'}")
    return merged.float()


def match_json(r: MatchResult | None) -> dict | None:
    return None if r is None else {"correct": r.correct, "total": r.total, "accuracy": r.accuracy}


def load_match_eval(cfg: SFTConfig, data: RunData) -> list:
    """The match evaluation's (prompt, reference) pairs, read with their images for a vision-language run."""
    if cfg.match_eval is None:
        return []
    if data.processor is not None:
        return load_match_examples(cfg.match_eval, images=True, vocab_size=len(data.tokenizer))
    return load_match_examples(cfg.match_eval)


def run_match_eval(model, parts: Components, match_cfg: MatchEvalConfig, when: str) -> MatchResult:
    """Exact match of `model`'s replies over the run's match examples, printed with a few samples."""
    t0, data, console = time.perf_counter(), parts.data, parts.console
    with parts.accelerator.autocast(), compiling.eager():  # the run's precision; compiled blocks run eagerly
        res = exact_match(
            model, data.tokenizer, parts.match_examples, match_cfg, data.template, data.processor
        )
    console.print(
        f"[bold]exact match {when} training[/bold]: {res.correct}/{res.total} = {res.accuracy:.1%} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    for prompt, ref, pred in res.samples[:3]:
        console.print(f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False)
    return res


def saved_tokenizer(data: RunData):
    """What is saved beside the weights: the run's tokenizer, or a vision-language model's processor (its
    tokenizer, image processor and template, so AutoProcessor loads the output directory), with the run's
    chat template."""
    processor = data.processor
    if data.template is not None:
        data.tokenizer.chat_template = data.template
        if processor is not None:
            processor.chat_template = data.template
    return processor if processor is not None else data.tokenizer


def save_model(model, tokenizer, out: Path, template: str | None, state_dict: dict | None = None) -> None:
    """Save weights (safetensors), config, tokenizer (or processor) and chat template for plain transformers.
    `state_dict`: the tensors to write instead of the model's own (gathered from a sharded engine)."""
    model.config.use_cache = True  # inference default for whoever loads it
    if template is not None:
        tokenizer.chat_template = template
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)  # None: the model's own
    tokenizer.save_pretrained(out)
    model.config.use_cache = False


def export_merged(run_dir: str | Path, out: str | Path) -> str:
    """`sftlab export --merge`: a LoRA run's adapter merged into its base, saved in `out` as a plain model with
    the run's tokenizer, or a vision-language model's processor (the run's, else its base's). Returns which."""
    model, tok = load_adapter_dir(run_dir)
    processor = model_processor(model, run_dir)
    saved = processor if processor is not None else tok
    save_model(model, saved, Path(out), saved.chat_template or tok.chat_template)
    return "processor" if processor is not None else "tokenizer"
