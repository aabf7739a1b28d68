"""Command line: `sftlab train|prepare|eval|report|export|config|generate|chat`.

    sftlab train [CONFIG.yaml] [key.path=value ...]   fine-tune (no CONFIG: the embedded demo)
    sftlab prepare [CONFIG.yaml] [overrides ...] [--show N]   tokenize and cache the data, print the data
                                                      report (--show: N examples per source, targets marked)
    sftlab eval MODEL_OR_RUN_DIR --data FILE [--match] [--json]   loss, perplexity (exact match) on a file
    sftlab report RUN_DIR                             regenerate report.md + loss.png
    sftlab export RUN_DIR --merge --out DIR           merge a LoRA adapter into a plain model
    sftlab config show|reference [CONFIG.yaml] [overrides ...]   resolved config / every key documented
    sftlab generate MODEL_DIR --prompt "..."          one greedy reply
    sftlab chat MODEL_DIR                             interactive chat
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from sftlab.config import ConfigError, config_reference, dump_config, load_config

console = Console(soft_wrap=True)


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load(args: list[str]):
    path, overrides = _split_config_args(args)
    return load_config(path, overrides)


def cmd_train(ns: argparse.Namespace) -> int:
    from sftlab.train.loop import run_training

    cfg = _load(ns.args)
    if not ns.args:
        console.print("[bold]sftlab[/bold]: no config given, running the embedded demo "
                      "(SmolLM2-135M-Instruct learns date conversion); `sftlab config show` prints it")
    run_training(cfg, console)
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    """Validate, tokenize and cache the training/eval data ahead of training; print the data report."""
    import time

    from sftlab.data.cache import cache_dir
    from sftlab.train.data import prepare_run_data, print_preview

    cfg = _load(ns.args)
    start = time.perf_counter()
    data = prepare_run_data(cfg, console)  # exactly what `sftlab train` does, so the cache keys match
    took = time.perf_counter() - start
    where = cache_dir(cfg.data.cache_dir) if cfg.data.cache else "off (data.cache=false)"
    console.print(f"train {len(data.train)} examples ({data.train.num_tokens} tokens) -> {len(data.units)} rows "
                  f"(packing: {cfg.data.packing}), eval {len(data.eval)}; prepared in {took:.1f}s; cache: {where}",
                  highlight=False)
    if ns.show:
        print_preview(data, cfg, console, ns.show)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    """Merge a run's adapter into its base model and save a plain transformers model."""
    from sftlab.model.adapters import is_adapter_dir, load_for_inference
    from sftlab.train.loop import save_model

    if not is_adapter_dir(ns.run_dir):
        raise ConfigError(f"{ns.run_dir} holds no adapter (adapter_config.json): nothing to merge")
    if not ns.merge:
        raise ConfigError("sftlab export: only --merge is supported (the adapter itself is already in the run dir)")
    model, tok = load_for_inference(ns.run_dir)
    save_model(model, tok, Path(ns.out), tok.chat_template)
    console.print(f"[bold green]saved[/bold green] merged model + tokenizer to {ns.out}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """Loss / perplexity over target tokens (and exact match) of a model on a data file."""
    import json

    from sftlab.train.evaluate import evaluate

    res = evaluate(ns.model_dir, ns.data, match=ns.match, batch_size=ns.batch_size,
                   max_new_tokens=ns.max_new_tokens, max_examples=ns.max_examples)
    if ns.json:
        print(json.dumps(res, indent=1))
        return 0
    console.print(f"[bold]{res['model']}[/bold] on {res['data']}: {res['examples']} examples "
                  f"({res['target_tokens']} target tokens, loss on {res['loss_on']}; {res['bad_rows']} bad rows, "
                  f"{res['over_length_dropped']} over length dropped)", highlight=False)
    console.print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}", highlight=False)
    if "exact_match" in res:
        em = res["exact_match"]
        console.print(f"exact match {em['correct']}/{em['total']} = {em['accuracy']:.1%}", highlight=False)
        for prompt, ref, pred in em["samples"][:3]:
            console.print(f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """Regenerate report.md + loss.png of a run directory."""
    from sftlab.train.report import PLOT, ReportError, write_report

    try:
        path = write_report(ns.run_dir)
    except ReportError as e:
        raise ConfigError(str(e)) from None
    console.print(f"[bold green]wrote[/bold green] {path} and {Path(ns.run_dir) / PLOT}")
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(dump_config(_load(ns.args)), end="")
    return 0


def _load_for_inference(model_dir: str):
    from sftlab.train.evaluate import load_model_dir

    return load_model_dir(model_dir)  # a LoRA run: its base model with the adapter merged in


def cmd_generate(ns: argparse.Namespace) -> int:
    from sftlab.model.generate import generate_replies

    model, tok = _load_for_inference(ns.model_dir)
    messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [{"role": "user", "content": ns.prompt}]
    print(generate_replies(model, tok, [messages], ns.max_new_tokens)[0].strip())
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from sftlab.model.generate import generate_replies

    model, tok = _load_for_inference(ns.model_dir)
    history = [{"role": "system", "content": ns.system}] if ns.system else []
    console.print("[dim]chat with the model; /reset clears history, /exit or Ctrl-D quits[/dim]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1] if ns.system else []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_replies(model, tok, [history], ns.max_new_tokens)[0].strip()
        history.append({"role": "assistant", "content": reply})
        console.print(f"[bold green]model>[/bold green] {reply}", highlight=False)


PREPARE_HELP = """\
Read, validate, tokenize and mask the configured data exactly as `sftlab train` does, cache it, and
print the data report: per source the rows, bad rows (file:line, field, reason), the format each row
was read as, fields that no reader of that format uses (ignored: map them with the source's
`columns`), the share of tokens that are targets, lengths and the length policy's counts.

--show N prints N sampled examples per source as they will be trained. On a terminal the target
tokens (those with a label, trained on) are bold green and the rest is dimmed. Otherwise (piped,
redirected, NO_COLOR) targets are wrapped in [[ and ]]; a literal [, ] or \\ that stands next to
another of these characters or to a mark is escaped with a backslash. --show reads only what was
prepared: the cache and training are unchanged. Row schemas: docs/data.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning of causal language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model (no config: the embedded demo)")
    t.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prepare", help="tokenize and cache the data ahead of training; print the data report",
                        description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    pr.add_argument("--show", type=int, default=0, metavar="N", help=(
        "also show what will be trained: N sampled examples per source (seeded by train.seed) with their target "
        "tokens marked, each source's format, target-token share and lengths, the packing and a length histogram"))
    pr.set_defaults(func=cmd_prepare)

    c = sub.add_parser("config", help="config utilities")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved config")
    cs.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    cs.set_defaults(func=cmd_config_show)
    cr = csub.add_parser("reference", help="print every config key with type, default and description (Markdown)")
    cr.set_defaults(func=lambda ns: print(config_reference()) or 0)

    ev = sub.add_parser("eval", help="loss / perplexity (and exact match) of a model or run dir on a data file")
    ev.add_argument("model_dir", help="a saved model directory or a run directory (LoRA adapters are merged)")
    ev.add_argument("--data", required=True, help="a data file in any supported format")
    ev.add_argument("--match", action="store_true", help="also exact match of greedy replies (JSONL conversations)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--max-examples", type=int, default=None)
    ev.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="regenerate a run's report.md + loss.png")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="merge a LoRA run's adapter into its base model (a plain transformers model)")
    e.add_argument("run_dir")
    e.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    e.add_argument("--out", required=True, help="directory for the merged model")
    e.set_defaults(func=cmd_export)

    for name, func, helptext in (("generate", cmd_generate, "one greedy reply to a prompt"),
                                 ("chat", cmd_chat, "interactive chat with a saved model")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("model_dir")
        if name == "generate":
            g.add_argument("--prompt", required=True)
        g.add_argument("--system", default=None, help="system message")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sftlab").setLevel(logging.DEBUG if ns.verbose else logging.INFO)
    # bitsandbytes (imported by peft when installed) warns about optional CPU kernels at import
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if ns.verbose else logging.ERROR)
    if not ns.verbose:  # our own progress and summaries say what happens; library bars are noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from sftlab.data.types import DataError
    from sftlab.model.adapters import AdapterError
    from sftlab.model.loading import ModelLoadError
    from sftlab.train.checkpoint import CheckpointError
    from sftlab.train.loop import Interrupted, RunError

    try:
        return ns.func(ns)
    except Interrupted as e:
        console.print(f"[bold yellow]interrupted[/bold yellow]: {e}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/bold yellow]: second Ctrl-C, exiting without a checkpoint")
        return 130
    except (ConfigError, DataError, ModelLoadError, AdapterError, RunError, CheckpointError) as e:
        console.print(f"[bold red]error[/bold red]: {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
