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

from sftlab.config.loading import dump_config
from sftlab.model import adapters
from sftlab.model.generate import MatchResult, exact_match
from sftlab.model.loading import DTYPES
from sftlab.trainer import compiling, rundir
from sftlab.trainer.card import write_model_cards
from sftlab.trainer.checkpoint import delete_checkpoints
from sftlab.trainer.data import data_report_json
from sftlab.trainer.inference import load_adapter_dir, load_model_dir, model_processor
from sftlab.trainer.master_weights import load_master_weights, master_weight_optimizer
from sftlab.trainer.metrics import MetricsLog, read_metrics
from sftlab.trainer.report import DATA_REPORT
from sftlab.trainer.run import Run, TrainResult
from sftlab.trainer.setup import compute_dtype


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


def open_run_log(run: Run) -> None:
    """metrics.jsonl (rewritten from the checkpoint's records when resuming), config.yaml, run.json."""
    cfg, main = run.cfg, run.main
    run.metrics = MetricsLog(run.out / "metrics.jsonl", run.console, enabled=main)
    if main:
        logged = set(run.logged_steps)
        run.metrics.rewrite([r for r in run.result.history if r["step"] in logged])
        (run.out / "config.yaml").write_text(dump_config(cfg))
        (run.out / "run.json").write_text(json.dumps(run_info(run), indent=1) + "\n")
        (run.out / DATA_REPORT).write_text(json.dumps(data_report_json(run.data), indent=1) + "\n")
        resolved = run.resolved
        run.console.print(
            f"[bold]train[/bold]: {resolved.total_steps} optimizer steps x {resolved.grad_accum_steps} "
            f"micro-batches of {resolved.micro_batch_size} (x{resolved.world_size} processes, "
            f"{resolved.engine}); "
            f"{run.stream.batches_per_epoch} micro-batches/epoch"
        )
        if resolved.total_steps < 2:
            run.console.print(
                f"[bold yellow]warning[/bold yellow]: this run ends after {resolved.total_steps} optimizer "
                "step: the saved model has taken a single update (set train.max_steps or "
                "train.num_epochs for more)",
                highlight=False,
            )
    run.callbacks.call("on_train_begin", run_info(run))


def run_info(run: Run) -> dict[str, Any]:
    """What `auto` settings resolved to on this machine (also printed at start): written from
    `run.resolved`, each decision's reason under "reasons"."""
    head = run.objective.loss_fn if hasattr(run.objective, "loss_fn") else None
    resolved = run.resolved
    return {
        "mixed_precision": resolved.mixed_precision,
        "weights_dtype": run.cfg.model.dtype,
        "compute_dtype": compute_dtype(run.cfg.model.dtype, resolved.mixed_precision),
        "master_weights_fp32": master_weight_optimizer(run.optimizer) is not None,
        "gradient_checkpointing": resolved.recompute,
        "compile": resolved.compiled,
        "loss_head": getattr(head, "mode", "full"),
        "loss_head_reason": getattr(head, "reason", ""),
        "device": str(run.accelerator.device),
        "num_processes": resolved.world_size,
        "engine": resolved.engine,
        "peak_flops": resolved.peak_flops,
        "total_steps": resolved.total_steps,
        "inputs": run.inputs.describe(),
        "weight_form": resolved.weight_form,
        "packed_attention": resolved.packed_attention,
        "micro_batch_size": resolved.micro_batch_size,
        "micro_batch_tokens": resolved.micro_batch_tokens,
        "grad_accum_steps": resolved.grad_accum_steps,
        "global_batch": resolved.global_batch,
        "global_batch_unit": resolved.global_batch_unit,
        "total_micro_batches": resolved.total_micro,
        "reasons": resolved.reasons(),
    }


def finish(run: Run) -> None:
    """Save the model (or adapter), run the match evaluation, end the callbacks, mark the run FINISHED."""
    run.accelerator.wait_for_everyone()
    # sharded engines: every rank takes part in gathering the whole model; the main process saves it
    gathered = run.engine.gathered_state_dict(run.model)
    if not run.main:
        return
    r = run.resolved
    if r.compile_key:  # this machine's step times, for the next run's train.compile: auto
        compiling.update_record(r.compile_key, r.compiled, run.step_times, r.tokens_per_step)
    unwrapped = run.engine.bare_model(run.model)
    if run.cfg.peft is not None:
        # the adapter; the model users get is the fp32 base with it merged (loaded back from the saved files)
        unwrapped = save_adapter_run(run, unwrapped, gathered)
    elif gathered is not None:
        dtype = DTYPES[run.cfg.model.dtype]
        save_model(
            unwrapped,
            saved_tokenizer(run),
            run.out,
            run.data.template,
            state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in gathered.items()},
        )
        run.console.print(
            f"[bold green]saved[/bold green] model (gathered from the shards) + tokenizer to {run.out}"
        )
        unwrapped = load_model_dir(run.out)[0] if run.cfg.match_eval is not None else None
    else:
        load_master_weights(
            unwrapped, run.optimizer
        )  # bf16 compute copies -> fp32 weights, the exact masters
        unwrapped.to(DTYPES[run.cfg.model.dtype])  # saved in the dtype asked for (model.dtype)
        save_model(unwrapped, saved_tokenizer(run), run.out, run.data.template)
        run.console.print(f"[bold green]saved[/bold green] model + tokenizer to {run.out}")
    if run.cfg.match_eval is not None:
        run.result.match_after = run_match_eval(unwrapped, run, "after")
        summary = {
            "before": match_json(run.result.match_before),
            "after": match_json(run.result.match_after),
            "samples_after": [list(s) for s in run.result.match_after.samples[:5]],
        }
        (run.out / "match_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    end_callbacks(run)
    cards = write_model_cards(
        run.out
    )  # README.md, from the run's files (metrics.jsonl ends with the last step)
    run.console.print(f"[bold]model card[/bold]: {', '.join(str(p) for p in cards)}", highlight=False)
    rundir.mark_finished(
        run.out,
        {"steps": r.total_steps, "final_loss": run.result.final_loss, "eval_loss": run.result.eval_loss},
    )
    if run.cfg.checkpoint.delete_at_end:
        removed = delete_checkpoints(run.out)
        if removed:
            run.console.print(
                f"[dim]deleted {removed} checkpoint(s): the run is finished (checkpoint.delete_at_end)[/dim]"
            )


def hf_model_writer(run: Run):
    """checkpoint.save_hf_model: a function writing `hf/` into a checkpoint being saved -- the model (or
    adapter) as the run's end would save it, in model.dtype with the tokenizer and chat template, from the
    exact fp32 masters, leaving the training model untouched. Sharded engines gather the weights here,
    on every rank (a collective); the function runs on the main process only."""
    gathered = run.engine.gathered_state_dict(run.model)
    unwrapped = run.engine.bare_model(run.model)

    def write(ckpt: Path) -> None:
        state = gathered if gathered is not None else _master_state_dict(unwrapped, run.optimizer)
        if run.cfg.peft is not None:
            adapters.save_adapter(unwrapped, ckpt / "hf", adapters.base_of(run.cfg.model), state_dict=state)
            saved_tokenizer(run).save_pretrained(ckpt / "hf")
            return
        dtype = DTYPES[run.cfg.model.dtype]
        save_model(
            unwrapped,
            saved_tokenizer(run),
            ckpt / "hf",
            run.data.template,
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


def end_callbacks(run: Run) -> None:
    """on_train_end on every callback (trackers finish, the report is written), then say where the report is."""
    run.callbacks.call("on_train_end", run.result)
    report = next((cb for cb in run.callbacks.callbacks if getattr(cb, "name", "") == "report"), None)
    if report is not None and report.path is not None:
        run.console.print(f"[bold]report[/bold]: {report.path} (+ {report.path.with_name('loss.png').name})")


def save_adapter_run(run: Run, model, gathered: dict | None = None):
    """Save the adapter (fp32 masters of the trainable weights, or their tensors `gathered` from a
    sharded engine) and the tokenizer; with peft.merge_on_save also the merged plain model under
    output_dir/merged (a fresh fp32 base and the saved adapter). Returns that merged model when the
    match evaluation needs it, else None."""
    if gathered is None:
        load_master_weights(model, run.optimizer)  # the adapter is saved from its exact fp32 masters
    adapters.save_adapter(model, run.out, adapters.base_of(run.cfg.model), state_dict=gathered)
    saved_tokenizer(run).save_pretrained(run.out)
    run.console.print(f"[bold green]saved[/bold green] adapter + tokenizer to {run.out}")
    if not (run.cfg.peft.merge_on_save or run.cfg.match_eval is not None):
        return None
    merged, _ = load_adapter_dir(run.out)
    if run.cfg.peft.merge_on_save:
        save_model(
            merged.to(DTYPES[run.cfg.model.dtype]),
            saved_tokenizer(run),
            run.out / "merged",
            run.data.template,
        )
        run.console.print(f"[bold green]saved[/bold green] merged model to {run.out / 'merged'}")
    return merged.float()


def match_json(r: MatchResult | None) -> dict | None:
    return None if r is None else {"correct": r.correct, "total": r.total, "accuracy": r.accuracy}


def run_match_eval(model, run: Run, when: str) -> MatchResult:
    t0 = time.perf_counter()
    with run.accelerator.autocast():  # in the precision the run trains in (bf16 weights need it)
        res = exact_match(
            model,
            run.data.tokenizer,
            run.match_examples,
            run.cfg.match_eval,
            run.data.template,
            getattr(run.data, "processor", None),
        )
    run.console.print(
        f"[bold]exact match {when} training[/bold]: {res.correct}/{res.total} = {res.accuracy:.1%} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    for prompt, ref, pred in res.samples[:3]:
        run.console.print(
            f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False
        )
    return res


def saved_tokenizer(run: Run):
    """What is saved beside the weights: the run's tokenizer, or a vision-language model's processor (its
    tokenizer, image processor and template, so AutoProcessor loads the output directory), with the run's
    chat template."""
    processor = getattr(run.data, "processor", None)
    if run.data.template is not None:
        run.data.tokenizer.chat_template = run.data.template
        if processor is not None:
            processor.chat_template = run.data.template
    return processor if processor is not None else run.data.tokenizer


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
