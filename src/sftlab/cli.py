"""Command line: `sftlab train|prepare|eval|report|export|push|config|convert-config|generate|chat`.

    sftlab train [CONFIG.yaml] [key.path=value ...]   fine-tune (no CONFIG: the embedded demo)
    sftlab train --data FILE [--model M] [--out DIR]  quick start: the library defaults (printed first)
    sftlab prepare [CONFIG.yaml] [overrides ...] [--show N]   tokenize, cache, report (--show: N marked examples)
    sftlab eval MODEL_OR_RUN_DIR --data FILE [--match] [--json]   loss, perplexity (exact match) on a file
    sftlab report RUN_DIR                             regenerate report.md + loss.png
    sftlab export RUN_DIR --merge --out DIR           merge a LoRA adapter into a plain model
    sftlab push RUN_DIR --repo-id ID [--private]      upload a finished run to the Hub (trainer/hub.py)
    sftlab config show|reference [CONFIG.yaml] [overrides ...]   resolved config / every key documented
    sftlab convert-config FILE --from TOOL [KEY=VALUE ...]      another tool's config as sftlab YAML
    sftlab generate MODEL --prompt "..." [--tools F]  one reply (greedy; --temperature/--top-p sample; --image P)
    sftlab chat MODEL [--tools FILE]                  interactive chat (piped stdin: one reply per line)

MODEL (generate/chat/eval): `default`, a run or checkpoint (RUN/checkpoints/step-N) directory, a model directory,
a .gguf file or a hub id.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from rich.console import Console

from sftlab.cli_checks import check_config_paths, check_eval_args, check_reply_args, check_run_dir
from sftlab.config.loading import dump_config, load_config
from sftlab.config.overrides import gives_training_data
from sftlab.config.reference import config_reference
from sftlab.config.schema import ConfigError
from sftlab.errors import SftlabError
from sftlab.migrate import TOOLS, print_converted
from sftlab.trainer import allocator  # light: no torch
from sftlab.trainer.control import Interrupted  # light: signal handling only

console = Console(soft_wrap=True)


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _quick_overrides(ns: argparse.Namespace) -> list[str]:
    """--data/--model/--out as overrides (values JSON-quoted, so any path survives YAML parsing). They go
    before the dotted overrides, which apply in order: `data.train.0.columns=...` edits the --data source."""
    out = []
    if getattr(ns, "data", None):
        out.append("data.train=" + json.dumps(ns.data))
    if getattr(ns, "model", None):
        out.append("model.name_or_path=" + json.dumps(ns.model))
    if getattr(ns, "out", None):
        out.append("train.output_dir=" + json.dumps(ns.out))
    return out


def _load(ns: argparse.Namespace):
    path, overrides = _split_config_args(ns.args)
    return load_config(path, _quick_overrides(ns) + overrides)


def _resume_command(argv: list[str]) -> str:
    """This very command line with train.resume=auto (instead of any train.resume given)."""
    kept = [a for a in argv if not a.startswith("train.resume=")]
    return shlex.join(["sftlab", *kept, "train.resume=auto"])


def _load_checked(ns: argparse.Namespace):
    """The config, with its local paths (data, model) checked before the heavy imports (a typo fails at once)."""
    cfg = _load(ns)
    check_config_paths(cfg)
    return cfg


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _load_checked(ns)
    if ns.own_process:  # a process started as `sftlab train` may re-execute itself with tcmalloc preloaded
        allocator.reexec_with(cfg.train.allocator)
    path, overrides = _split_config_args(ns.args)
    overrides = _quick_overrides(ns) + overrides
    if path is None and gives_training_data(overrides):
        console.print(
            "[bold]sftlab[/bold]: no config file: the library defaults with your settings (save this as "
            "a YAML file to change more; `sftlab config reference` documents every key):",
            highlight=False,
        )
        console.print(dump_config(cfg), markup=False, highlight=False, end="")
    elif path is None:
        console.print(
            "[bold]sftlab[/bold]: no config given, running the embedded demo "
            "(SmolLM2-135M-Instruct learns date conversion)"
            + (" with your overrides" if overrides else "")
            + "; `sftlab config show` prints it; `sftlab train --data FILE` starts from the library "
            "defaults instead",
            highlight=False,
        )
    from sftlab.api import train

    result = train(cfg, console=console, resume_command=_resume_command(ns.argv))
    return 3 if result.push_error else 0  # the run is complete; its upload failed (the retry was printed)


def cmd_prepare(ns: argparse.Namespace) -> int:
    """Validate, tokenize and cache the training/eval data ahead of training; print the data report."""
    import time

    cfg = _load_checked(ns)  # before the imports below (torch, transformers: seconds)
    from sftlab.api import prepare
    from sftlab.data.store import cache_dir
    from sftlab.trainer.data import print_preview

    start = time.perf_counter()
    data = prepare(cfg, console=console)  # exactly what `sftlab train` does, so the cache keys match
    took = time.perf_counter() - start
    where = cache_dir(cfg.data.cache_dir) if cfg.data.cache else "off (data.cache=false)"
    console.print(
        f"train {len(data.train)} examples ({data.train.num_tokens} tokens) -> {len(data.units)} rows "
        f"(packing: {cfg.data.packing}), eval {len(data.eval)}; prepared in {took:.1f}s; cache: {where}",
        highlight=False,
    )
    if ns.show:
        print_preview(data, cfg, console, ns.show)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    """Merge a run's adapter into its base model and save a plain transformers model."""
    if not ns.merge:
        raise ConfigError(
            "sftlab export: only --merge is supported (the adapter itself is already in the run dir)"
        )
    check_run_dir(ns.run_dir)
    from sftlab.model.adapters import is_adapter_dir
    from sftlab.trainer.outputs import export_merged

    if not is_adapter_dir(ns.run_dir):
        raise ConfigError(f"{ns.run_dir} holds no adapter (adapter_config.json): nothing to merge")
    saved = export_merged(ns.run_dir, ns.out)
    console.print(f"[bold green]saved[/bold green] merged model + {saved} to {ns.out}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """Loss / perplexity over target tokens (and exact match) of a model on a data file."""
    columns, roles = check_eval_args(ns)  # before the import below (torch, transformers: seconds)
    from sftlab.trainer.evaluate import evaluate

    res = evaluate(
        ns.model_dir,
        ns.data,
        match=ns.match,
        batch_size=ns.batch_size,
        max_new_tokens=ns.max_new_tokens,
        max_examples=ns.max_examples,
        columns=columns,
        roles=roles,
    )
    if ns.json:
        print(json.dumps(res, indent=1))
        return 0
    console.print(
        f"[bold]{res['model']}[/bold] on {res['data']}: {res['examples']} examples "
        f"({res['target_tokens']} target tokens, loss on {res['loss_on']}; {res['bad_rows']} bad rows, "
        f"{res['over_length_dropped']} over length dropped)",
        highlight=False,
    )
    if res["mapping"]["from"] != "none":
        console.print(
            f"fields mapped ({res['mapping']['from']}): columns {res['mapping']['columns']}, "
            f"roles {res['mapping']['roles']}",
            highlight=False,
        )
    console.print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}", highlight=False)
    if "exact_match" in res:
        em = res["exact_match"]
        console.print(f"exact match {em['correct']}/{em['total']} = {em['accuracy']:.1%}", highlight=False)
        for prompt, ref, pred in em["samples"][:3]:
            console.print(
                f"  {prompt[:60]!r} -> {pred.strip()[:60]!r} (reference {ref[:60]!r})", highlight=False
            )
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    """Regenerate report.md + loss.png of a run directory."""
    check_run_dir(ns.run_dir)
    from sftlab.trainer.report import PLOT, write_report

    path = write_report(ns.run_dir)  # not a run dir: ReportError, a SftlabError (one line, exit code 2)
    console.print(f"[bold green]wrote[/bold green] {path} and {Path(ns.run_dir) / PLOT}")
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(dump_config(_load(ns)), end="")
    return 0


def _reply(ns: argparse.Namespace):
    """The model and a reply function with the command's sampling settings (trainer/inference.py)."""
    check_reply_args(ns)  # before the import below (torch, transformers: seconds)
    from sftlab.trainer.inference import reply_function

    return reply_function(
        ns.model_dir,
        tools_file=ns.tools,
        images=ns.image,
        seed=ns.seed,
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
    )


def cmd_generate(ns: argparse.Namespace) -> int:
    reply = _reply(ns)
    messages = ([{"role": "system", "content": ns.system}] if ns.system else []) + [
        {"role": "user", "content": ns.prompt}
    ]
    print(reply(messages))
    return 0


def _next_line(interactive: bool) -> str | None:
    """The user's next line (None at end of input); the `you>` prompt only on a terminal."""
    try:
        if interactive:
            return console.input("[bold cyan]you>[/bold cyan] ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except (EOFError, KeyboardInterrupt):
        return None


def cmd_chat(ns: argparse.Namespace) -> int:
    reply = _reply(ns)
    history = [{"role": "system", "content": ns.system}] if ns.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        console.print("[dim]chat with the model; /reset clears history, /exit or Ctrl-D quits[/dim]")
    while True:
        text = _next_line(interactive)
        if text is None:
            if interactive:
                console.print()
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1] if ns.system else []
            continue
        history.append({"role": "user", "content": text})
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
        console.print(f"[bold green]model>[/bold green] {answer}", highlight=False)


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
    from sftlab.trainer import hub as push  # `sftlab push` (its own module: cli.py stays short)

    p = argparse.ArgumentParser(
        prog="sftlab", description="Supervised fine-tuning of causal language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    _training_parsers(sub)

    c = sub.add_parser("config", help="config utilities")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved config")
    _config_args(cs)
    cs.set_defaults(func=cmd_config_show)
    cr = csub.add_parser(
        "reference", help="print every config key with type, default and description (Markdown)"
    )
    cr.set_defaults(func=lambda ns: print(config_reference()) or 0)

    _eval_parser(sub)
    cc = sub.add_parser(
        "convert-config",
        help="a TRL, axolotl, LLaMA-Factory, open-instruct, Fast-LLM or HALOs config as sftlab YAML "
        "(docs/migrating.md)",
    )
    cc.add_argument("file", help="the tool's YAML/JSON config, or (open-instruct, HALOs) its launch script")
    cc.add_argument("--from", dest="tool", required=True, choices=list(TOOLS))
    cc.add_argument(
        "args",
        nargs="*",
        metavar="KEY=VALUE",
        help="the tool's key=value overrides (Hydra's ++key=value, model=llama, ...)",
    )
    cc.set_defaults(func=print_converted)

    r = sub.add_parser("report", help="regenerate a run's report.md + loss.png")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    e = sub.add_parser(
        "export", help="merge a LoRA run's adapter into its base model (a plain transformers model)"
    )
    e.add_argument("run_dir")
    e.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    e.add_argument("--out", required=True, help="directory for the merged model")
    e.set_defaults(func=cmd_export)
    push.add_push_parser(sub)

    _reply_parsers(sub)
    return p


def _training_parsers(sub) -> None:
    """`sftlab train` and `sftlab prepare` (config file + dotted overrides)."""
    t = sub.add_parser(
        "train", help="fine-tune a model (no config: the embedded demo; --data: the library defaults)"
    )
    _config_args(t)
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "prepare",
        help="tokenize and cache the data ahead of training; print the data report",
        description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_args(pr)
    pr.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help=(
            "also show what will be trained: N sampled examples per source (seeded by train.seed) with their target "
            "tokens marked, each source's format, target-token share and lengths, the packing and a length histogram"
        ),
    )
    pr.set_defaults(func=cmd_prepare)


def _reply_parsers(sub) -> None:
    """`sftlab generate` and `sftlab chat`: a model and the sampling settings."""
    for name, func, helptext in (
        ("generate", cmd_generate, "one reply to a prompt (greedy unless --temperature)"),
        ("chat", cmd_chat, "chat with a model (interactive; piped stdin: a reply per line)"),
    ):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("model_dir", metavar="MODEL", help=MODEL_HELP)
        if name == "generate":
            g.add_argument("--prompt", required=True)
        g.add_argument("--system", default=None, help="system message")
        g.add_argument(
            "--tools", metavar="FILE", help="a JSON file: a list of tool schemas handed to the chat template"
        )
        g.add_argument(
            "--image", action="append", metavar="PATH", help="an image shown to a vision-language model"
        )
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument(
            "--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling"
        )
        g.add_argument(
            "--top-p", type=float, default=1.0, help="sampling: the nucleus probability mass (default 1)"
        )
        g.add_argument("--seed", type=int, default=None, help="sampling: torch seed, for repeatable replies")
        g.set_defaults(func=func)


MODEL_HELP = (
    "`default` (the embedded SmolLM2-135M-Instruct), a run directory (LoRA adapters merged; an unfinished "
    "run: its latest checkpoint), a checkpoint directory (RUN/checkpoints/step-N), a Hugging Face model "
    "directory, a .gguf file or a hub id"
)


def _eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="loss / perplexity (and exact match) of a model or run dir on a data file"
    )
    ev.add_argument("model_dir", help=MODEL_HELP)
    ev.add_argument("--data", required=True, help="a data file in any supported format")
    ev.add_argument(
        "--match", action="store_true", help="also exact match of greedy replies (JSONL conversations)"
    )
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--max-examples", type=int, default=None)
    ev.add_argument(
        "--columns",
        metavar="FIELD=YOURS,...",
        help=(
            "rename the file's fields onto the format's, e.g. prompt=question,completion=answer (default: the run's "
            "own mapping when all its training sources share one; docs/data.md)"
        ),
    )
    ev.add_argument(
        "--roles", metavar="YOURS=ROLE,...", help="rename role names, e.g. human=user,gpt=assistant"
    )
    ev.set_defaults(func=cmd_eval)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help=(
            "training data (repeat for a mix), as data.train=FILE; without a CONFIG the config starts from the library "
            "defaults, not the demo. key=value overrides apply on top (data.train.0.columns=..., data.train.1.weight=...)"
        ),
    )
    p.add_argument(
        "--model", metavar="PATH", help="model.name_or_path (default: `default`, the embedded model)"
    )
    p.add_argument("--out", metavar="DIR", help="train.output_dir")


def _quiet_progress_bars() -> None:
    """transformers' and huggingface_hub's progress bars off without importing transformers (seconds):
    huggingface_hub's switch, which transformers reads when it is imported (and its own when it already is)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the command line's own process (not a caller's: never re-executed)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(ns, "args") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides after an option (`--data x.jsonl optim.lr=1e-4`)
        ns.args += extra
    ns.argv = argv
    ns.own_process = own_process
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("sftlab").setLevel(logging.DEBUG if ns.verbose else logging.INFO)
    # bitsandbytes (imported by peft when installed) warns about optional CPU kernels at import
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if ns.verbose else logging.ERROR)
    if not ns.verbose:  # our own progress and summaries say what happens; library bars are noise
        _quiet_progress_bars()
    try:
        return ns.func(ns)
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/bold yellow]: second Ctrl-C, exiting without a checkpoint")
        return 130
    except Interrupted as e:  # a signal stopped the run after its checkpoint: exit code 128 + signal number
        console.print(f"[bold yellow]interrupted[/bold yellow]: {e}", highlight=False)
        return e.exit_code
    except (
        SftlabError
    ) as e:  # sftlab's own refusals: one line; anything else is a bug and shows its traceback
        console.print(f"[bold red]error[/bold red]: {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
