"""The training loop: one file, top to bottom, from config to saved model.

Follow one optimizer step: `MicroBatchStream` picks example indices -> `pad_collate` builds
tensors -> the model returns logits -> `summed_nll` sums the token losses -> the sum is divided by
the number of target tokens of the WHOLE optimizer step (all micro-batches, all ranks) and
back-propagated -> gradients are clipped -> AdamW and the LR schedule step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sftlab.config import SFTConfig, dump_config
from sftlab.data.collate import MicroBatchStream, pad_collate
from sftlab.data.dataset import build_datasets, load_template
from sftlab.data.masking import IGNORE_INDEX, TokenizedExample
from sftlab.data.templates import add_chatml_tokens, resize_for_new_tokens
from sftlab.data.packing import pack_examples, packed_collate, packing_efficiency
from sftlab.model.generate import MatchResult, exact_match, load_match_examples
from sftlab.model.loading import load_model, load_tokenizer, resolve_model_path
from sftlab.model.loss import count_targets, summed_nll
from sftlab.train.checkpoint import (COMPLETE, latest_checkpoint, load_checkpoint, read_state,
                                     save_checkpoint)
from sftlab.train.metrics import MetricsLog
from sftlab.train.optim import build_optimizer, build_scheduler


class RunError(RuntimeError):
    """The run cannot start or continue; the message says why."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None = None
    match_before: MatchResult | None = None
    match_after: MatchResult | None = None
    history: list[dict] = field(default_factory=list)


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output_dir {path} is not writable: {e.strerror or e}") from None


def plan_micro_batches(cfg: SFTConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches) of the run: max_steps wins over num_epochs."""
    accum = cfg.train.grad_accum_steps
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, cfg.train.max_steps * accum
    micro = math.ceil(cfg.train.num_epochs * batches_per_epoch)
    return math.ceil(micro / accum), micro


@torch.no_grad()
def evaluate_loss(model, examples: list[TokenizedExample], batch_size: int, pad_id: int,
                  accelerator: Accelerator) -> float:
    model = accelerator.unwrap_model(model)  # plain forward: ranks may run different numbers of batches
    was_training = model.training
    model.eval()
    nll, count = torch.zeros((), dtype=torch.float64), 0
    rank, world = accelerator.process_index, accelerator.num_processes
    for start in range(rank * batch_size, len(examples), batch_size * world):
        batch = {k: v.to(accelerator.device) for k, v in pad_collate(examples[start:start + batch_size], pad_id).items()}
        nll += summed_nll(forward_logits(model, batch), batch["labels"]).double().cpu()
        count += count_targets(batch["labels"])
    totals = accelerator.reduce(torch.tensor([nll.item(), float(count)], device=accelerator.device), "sum")
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Padded batches carry an attention mask; packed ones carry restarting position_ids and no mask
    (transformers then builds a block-diagonal mask: no document attends to another)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), use_cache=False).logits


def train_step(model, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> tuple[float, int]:
    """Forward/backward over the micro-batches of one optimizer step.

    Returns (summed NLL over all ranks, global target tokens).
    The loss each micro-batch back-propagates is its NLL sum / global target count, times the
    world size because DDP averages gradients over ranks: the step's gradient is then exactly
    the gradient of (sum of all token NLLs of the step) / (all target tokens of the step).
    """
    local_targets = sum(count_targets(b["labels"]) for b in batches)
    global_targets = int(accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum"))
    if global_targets == 0:
        return 0.0, 0
    scale = accelerator.num_processes / global_targets
    step_nll = torch.zeros((), dtype=torch.float64)
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            nll = summed_nll(forward_logits(model, batch), batch["labels"])
            accelerator.backward(nll * scale)
        step_nll += nll.detach().double().cpu()
    total_nll = float(accelerator.reduce(step_nll.to(accelerator.device), "sum"))
    return total_nll, global_targets


class StopRequest:
    """SIGINT/SIGTERM: finish the current optimizer step, checkpoint, exit. A second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def data_fingerprint(examples: list[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


# Config keys that may change between a checkpoint and its resumption; everything else must match.
RESUME_SAFE_KEYS = ("train.log_every", "train.eval_every", "train.resume", "train.output_dir", "checkpoint.",
                    "match_eval", "data.num_proc", "data.cache", "data.cache_dir", "data.on_bad_record",
                    "data.max_bad_fraction", "train.on_nan")


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def check_resume_compatible(saved: dict, cfg: SFTConfig, ckpt: Path) -> None:
    old, new = dict(_flatten(saved)), dict(_flatten(cfg.model_dump(mode="json")))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUME_SAFE_KEYS))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise RunError(f"cannot resume from {ckpt}: the config changed in ways that break the run ({details}). "
                       "Only logging, evaluation and checkpoint settings may change; start a new output_dir instead.")


def find_resume_checkpoint(cfg: SFTConfig) -> Path | None:
    spec = cfg.train.resume
    if spec is None:
        return None
    if spec == "auto":
        return latest_checkpoint(Path(cfg.train.output_dir))
    path = Path(spec)
    if (path / COMPLETE).is_file():
        return path
    found = latest_checkpoint(path)  # an output_dir was given
    if found is None:
        raise RunError(f"train.resume: {spec} is not a complete checkpoint nor an output_dir holding one")
    return found


def check_disk_space(out: Path, model, cfg: SFTConfig) -> None:
    if cfg.checkpoint.every_steps is None and not cfg.checkpoint.every_epoch:
        return
    need = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # weights + 2 Adam moments
    free = shutil.disk_usage(out).free
    if free < need:
        raise RunError(f"output_dir {out}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
                       f"{need / 2**20:.0f} MiB; free space or set checkpoint.every_steps/every_epoch off")


def run_training(cfg: SFTConfig, console: Console | None = None) -> TrainResult:
    console = console or Console(soft_wrap=True)
    out = Path(cfg.train.output_dir)
    accelerator = Accelerator()
    main = accelerator.is_main_process
    if main:
        check_output_dir(out)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is not None:
        check_resume_compatible(read_state(resume_from)["config"], cfg, resume_from)
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    # --- model path and tokenizer first (cheap), then data (fails fast on bad rows), then weights.
    # The main process converts/caches first; the other ranks then read its caches.
    with accelerator.main_process_first():
        model_path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg.model, model_path)
        vocab_before = len(tokenizer)
        if cfg.data.add_chatml_tokens:
            add_chatml_tokens(tokenizer)
        template = load_template(cfg.data, tokenizer)
        train_set, eval_set, report = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        match_examples = load_match_examples(cfg.match_eval) if cfg.match_eval is not None else []
    pad_id = tokenizer.pad_token_id
    if cfg.data.packing == "none":
        units: list = train_set
        collate = functools.partial(pad_collate, pad_id=pad_id)
        packing_note = ""
    else:  # micro_batch_size then counts packed rows of max_seq_length tokens
        units = pack_examples(train_set, cfg.data.packing, cfg.data.max_seq_length)
        collate = functools.partial(packed_collate, pad_id=pad_id)
        packing_note = (f"; packed ({cfg.data.packing}) into {len(units)} rows of <= {cfg.data.max_seq_length} tokens, "
                        f"efficiency {packing_efficiency(units, cfg.data.max_seq_length):.1%}")
    checkpointing = cfg.checkpoint.every_steps is not None or cfg.checkpoint.every_epoch
    fingerprint = data_fingerprint(units) if (checkpointing or resume_from is not None) else None
    if main:
        console.print(f"[bold]data[/bold]: {escape(report.summary())}{packing_note}", highlight=False)
        for line in report.bad_examples:
            console.print(f"  [yellow]skipped[/yellow] {escape(line)}", highlight=False)
    model = load_model(cfg.model, model_path)
    if cfg.data.add_chatml_tokens:  # new rows (if any) and the model's eos follow the tokenizer
        resize_for_new_tokens(model, tokenizer, vocab_before)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if main:
        check_disk_space(out, model, cfg)

    world = accelerator.num_processes
    stream = MicroBatchStream(len(units), cfg.train.micro_batch_size * world, cfg.train.seed)
    total_steps, total_micro = plan_micro_batches(cfg, stream.batches_per_epoch)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    result = TrainResult(output_dir=out, steps=total_steps, final_loss=None)
    start_step, consumed = 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, scheduler)
        if state.get("num_processes", 1) != world:
            raise RunError(f"cannot resume from {resume_from}: it was written by {state.get('num_processes', 1)} "
                           f"process(es), this run has {world}; the data order and batch geometry would change")
        if state["data_fingerprint"] != fingerprint:
            raise RunError(f"cannot resume from {resume_from}: the training data changed since it was written "
                           "(different tokenized examples); start a new output_dir instead")
        start_step, consumed = state["step"], state["consumed_micro_batches"]
        stream.epoch, stream.index = state["data"]["epoch"], state["data"]["index"]
        result.history = state["metrics"]
        result.match_before = _match_from_state(state.get("match_before"))
        if main:
            console.print(f"[bold]resumed[/bold] from {resume_from} at step {start_step}")

    if cfg.match_eval is not None and main and resume_from is None:
        result.match_before = run_match_eval(accelerator.unwrap_model(model), tokenizer, match_examples, cfg, template,
                                             console, "before")

    metrics = MetricsLog(out / "metrics.jsonl", console, enabled=main)
    if main:
        metrics.rewrite([r for r in result.history if r.get("logged")])
        (out / "config.yaml").write_text(dump_config(cfg))
        console.print(f"[bold]train[/bold]: {total_steps} optimizer steps x {cfg.train.grad_accum_steps} micro-batches "
                      f"of {cfg.train.micro_batch_size} (x{world} processes); {stream.batches_per_epoch} micro-batches/epoch")

    def checkpoint(step: int) -> Path:
        state = {"step": step, "consumed_micro_batches": consumed, "data": stream.state(), "num_processes": world,
                 "data_fingerprint": fingerprint or data_fingerprint(units), "metrics": result.history,
                 "match_before": _acc(result.match_before), "config": cfg.model_dump(mode="json")}
        return save_checkpoint(accelerator, out, step, state, scheduler, cfg.checkpoint.keep_last)

    batches_iter = iter(stream)
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not main or not console.is_terminal)
    with progress, StopRequest() as stop:
        task = progress.add_task("training", total=total_steps, completed=start_step)
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            epoch_before = stream.epoch
            position = stream.state()
            n_micro = min(cfg.train.grad_accum_steps, total_micro - consumed)
            batches, in_tokens = [], 0
            for _ in range(n_micro):
                idx = next(batches_iter)[accelerator.process_index::world]
                if idx:
                    batch = collate([units[i] for i in idx])
                    in_tokens += sum(len(units[i].input_ids) for i in idx)
                else:  # a short last batch left this rank nothing: run one unit with no targets, so DDP stays in step
                    batch = collate([units[0]])
                    batch["labels"].fill_(IGNORE_INDEX)
                batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
            consumed += n_micro
            nll, targets = train_step(model, batches, accelerator)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm)) if targets else 0.0
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(nll) and math.isfinite(grad_norm)
            if not finite and cfg.train.on_nan == "stop":
                last = latest_checkpoint(out)
                raise RunError(f"non-finite {'loss' if not math.isfinite(nll) else 'gradient norm'} at step {step} "
                               f"(epoch {position['epoch']}, micro-batches {position['index']}..{position['index'] + n_micro - 1} "
                               f"of that epoch's order, seed {position['seed']}); stopped without updating the weights. "
                               + (f"Last good checkpoint: {last}" if last else "No checkpoint was saved yet")
                               + " (train.on_nan=skip_step skips such steps)")
            if targets and finite:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": round(stream.epoch_progress, 4),
                      "loss": nll / targets if targets else float("nan"), "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": in_tokens * world / elapsed, "target_tokens": targets,
                      "step_time_s": round(elapsed, 4)}
            if not finite:
                record["skipped"] = "non-finite loss or gradient"
            if cfg.train.eval_every and eval_set and step % cfg.train.eval_every == 0 and step != total_steps:
                record["eval_loss"] = evaluate_loss(model, eval_set, cfg.train.micro_batch_size, pad_id, accelerator)
            if step == total_steps and eval_set:
                record["eval_loss"] = result.eval_loss = evaluate_loss(model, eval_set, cfg.train.micro_batch_size, pad_id, accelerator)
            record["logged"] = step % cfg.train.log_every == 0 or step == total_steps or "eval_loss" in record or not finite
            result.history.append(record)
            result.final_loss = record["loss"]
            if record["logged"]:
                metrics.write(record)
                metrics.show(record, total_steps)
            progress.advance(task)

            every = cfg.checkpoint.every_steps
            if (every and step % every == 0) or (cfg.checkpoint.every_epoch and stream.epoch > epoch_before) \
                    or (stop.signum is not None):
                path = checkpoint(step)
                if main:
                    console.print(f"[dim]checkpoint {path}[/dim]")
            _test_hooks(step)
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"{name}: stopped after step {step}/{total_steps} and saved {path}; "
                                  f"resume with: sftlab train <config> train.resume=auto train.output_dir={out}",
                                  128 + stop.signum)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if main:
        save_model(unwrapped, tokenizer, out, template)
        console.print(f"[bold green]saved[/bold green] model + tokenizer to {out}")
    if cfg.match_eval is not None and main:
        result.match_after = run_match_eval(unwrapped, tokenizer, match_examples, cfg, template, console, "after")
        summary = {"before": _acc(result.match_before), "after": _acc(result.match_after)}
        (out / "match_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _test_hooks(step: int) -> None:
    """SFTLAB_TEST_KILL_AFTER_STEP=k: SIGKILL this process after step k (resume tests kill a real run)."""
    kill_at = os.environ.get("SFTLAB_TEST_KILL_AFTER_STEP")
    if kill_at and int(kill_at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _acc(r: MatchResult | None) -> dict | None:
    return None if r is None else {"correct": r.correct, "total": r.total, "accuracy": r.accuracy}


def _match_from_state(saved: dict | None) -> MatchResult | None:
    return None if saved is None else MatchResult(saved["correct"], saved["total"], [])


def run_match_eval(model, tokenizer, examples, cfg: SFTConfig, template, console: Console, when: str) -> MatchResult:
    t0 = time.perf_counter()
    res = exact_match(model, tokenizer, examples, cfg.match_eval, template)
    console.print(f"[bold]exact match {when} training[/bold]: {res.correct}/{res.total} = {res.accuracy:.1%} "
                  f"({time.perf_counter() - t0:.0f}s)")
    for prompt, ref, pred in res.samples[:3]:
        console.print(f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False)
    return res


def save_model(model, tokenizer, out: Path, template: str | None) -> None:
    """Save weights (safetensors), config, tokenizer and chat template for plain transformers."""
    model.config.use_cache = True  # inference default for whoever loads it
    if template is not None:
        tokenizer.chat_template = template
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.config.use_cache = False
