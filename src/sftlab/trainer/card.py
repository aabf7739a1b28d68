"""The model card: README.md with Hub metadata, written into every final output directory of a run.

`write_model_cards(run_dir)` writes `README.md` into the run's output directory (the model or the
adapter) and into `merged/` when the run saved a merged model, from the run's own files (config.yaml,
run.json, data_report.json, FINISHED, metrics.jsonl), so `sftlab push` can write it again later.

Metadata (parsed by `huggingface_hub.ModelCard`): base_model (a hub id only; a local directory is
named in the text), datasets (the hub datasets among the sources), library_name (peft for an adapter,
else transformers), tags, license (from the base model's own card when it is on this machine: a local
directory's README.md or the Hub cache), pipeline_tag. The text: what was trained, a transformers
usage snippet, the hyperparameters, the data summary and the final losses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sftlab.trainer.metrics import read_metrics

CARD = "README.md"
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # model.name_or_path `default` is its GGUF
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a hub id and is no local path."""
    if name == "default":
        return DEFAULT_BASE
    return name if name and HUB_ID.fullmatch(name) and not Path(name).exists() else None


def _base_name(run_dir: Path, tree: dict) -> str:
    adapter = _json(run_dir / "adapter_config.json") or {}
    return (
        adapter.get("base_model_name_or_path") or (tree.get("model") or {}).get("name_or_path") or "unknown"
    )


def base_license(base: str) -> str | None:
    """The license in the base model's card, when that card is on this machine (never downloaded)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    local = Path(base) / CARD if Path(base).is_dir() else None
    if local is None and _hub_id(base):
        try:
            cached = try_to_load_from_cache(_hub_id(base), CARD)
        except Exception:  # a malformed id or cache: the license is simply unknown
            cached = None
        local = Path(cached) if isinstance(cached, str) else None
    if local is None or not local.is_file():
        return None
    try:
        return ModelCard.load(local).data.license
    except Exception:  # an unreadable card names no license
        return None


def card_metadata(run_dir: Path, tree: dict, adapter: bool):
    from huggingface_hub import ModelCardData

    base = _base_name(run_dir, tree)
    sources = ((tree.get("data") or {}).get("train") or []) + ((tree.get("data") or {}).get("eval") or [])
    datasets = list(dict.fromkeys(h for s in sources if (h := _hub_id(s.get("path")))))
    return ModelCardData(
        base_model=_hub_id(base),
        datasets=datasets or None,
        license=base_license(base),
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["sftlab", "sft", "lora" if adapter else "full-fine-tune"],
    )


def _usage(model_id: str, adapter: bool, subfolder: str | None) -> list[str]:
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    note = (
        [
            "",
            "The adapter loads onto its base model through transformers' peft integration "
            "(`pip install peft`).",
        ]
        if adapter
        else []
    )
    return [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{model_id}"',
        f"tokenizer = AutoTokenizer.from_pretrained(model_id{sub})",
        f"model = AutoModelForCausalLM.from_pretrained(model_id{sub})",
        'messages = [{"role": "user", "content": "Hello!"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "out = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        *note,
    ]


def _hyperparameters(tree: dict, info: dict) -> list[tuple[str, str]]:
    train, optim, data = tree.get("train") or {}, tree.get("optim") or {}, tree.get("data") or {}
    procs = info.get("num_processes", 1)
    if train.get("micro_batch_tokens"):
        batch = f"{train['micro_batch_tokens']} tokens per micro-batch"
    else:
        batch = f"{train.get('micro_batch_size')} rows per micro-batch"
    accum = train.get("grad_accum_steps", 1)
    warmup = (
        f"{optim['warmup_steps']} steps"
        if optim.get("warmup_steps") is not None
        else f"{optim.get('warmup_ratio')} of the steps"
    )
    rows = [
        ("optimizer steps", str(info.get("total_steps", train.get("max_steps", "-")))),
        ("learning rate", f"{optim.get('lr')} ({optim.get('scheduler')} schedule, warmup {warmup})"),
        (
            "optimizer",
            f"{optim.get('name', 'adamw')}, weight decay {optim.get('weight_decay')}, "
            f"gradient clipping {optim.get('max_grad_norm')}",
        ),
        ("batch", f"{batch} x {accum} accumulation steps x {procs} processes"),
        (
            "sequence length",
            f"{data.get('max_seq_length')} tokens, packing {data.get('packing')}, "
            f"loss on {data.get('loss_on')}",
        ),
        (
            "precision",
            f"mixed precision {info.get('mixed_precision', train.get('mixed_precision'))}, weights "
            f"{info.get('weights_dtype', (tree.get('model') or {}).get('dtype'))}",
        ),
        ("seed", str(train.get("seed"))),
    ]
    peft = tree.get("peft")
    if peft:
        targets = peft.get("target_modules")
        rows.append(
            (
                "adapter",
                f"{peft.get('method')} r={peft.get('r')} alpha={peft.get('alpha')} "
                f"dropout={peft.get('dropout')} targets={targets}"
                + (f", base quantized {peft['quantize']}" if peft.get("quantize") else "")
                + (", rsLoRA" if peft.get("use_rslora") else ""),
            )
        )
    return rows


def _results(run_dir: Path) -> list[str]:
    done = _json(run_dir / "FINISHED") or {}
    records = read_metrics(run_dir / "metrics.jsonl")
    final = done.get("final_loss", records[-1].get("loss") if records else None)
    evals = {k: v for r in records for k, v in r.items() if k.startswith("eval") and k.endswith("loss")}
    rows = [("final training loss", f"{final:.4f}" if isinstance(final, float) else "-")]
    rows += [
        (("final validation loss" if k == "eval_loss" else k), f"{v:.4f}") for k, v in sorted(evals.items())
    ]
    match = _json(run_dir / "match_eval.json") or {}
    if match.get("after"):
        rows.append(("exact match after training", f"{match['after']['correct']}/{match['after']['total']}"))
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _data_lines(tree: dict, run_dir: Path) -> list[str]:
    data = tree.get("data") or {}
    out = []
    for kind in ("train", "eval"):
        for s in data.get(kind) or []:
            path = s.get("path", "")
            shown = path if _hub_id(path) else Path(path).name
            out.append(
                f"- {kind}: `{s.get('name') or shown}`"
                + (f" ({shown})" if s.get("name") else "")
                + (f", weight {s['weight']}" if s.get("weight") is not None else "")
            )
    report = _json(run_dir / "data_report.json") or {}
    if report.get("summary"):
        out += ["", "```", report["summary"], "```"]
    return out or ["(the data sources were passed as objects through the Python API)"]


def card_text(run_dir: str | Path, repo_id: str | None = None, merged: bool = False) -> str:
    """The card of the model in `run_dir` (its `merged/` model when `merged`), as README.md text."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    tree = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    tree = tree or {}
    info = _json(run_dir / "run.json") or {}
    adapter = (run_dir / "adapter_config.json").is_file() and not merged
    base = _base_name(run_dir, tree)
    repo_id = repo_id or (tree.get("train") or {}).get("hub_model_id")
    title = repo_id.split("/")[-1] if repo_id else run_dir.name
    shown_base = (
        f"[{_hub_id(base)}](https://huggingface.co/{_hub_id(base)})" if _hub_id(base) else f"`{base}`"
    )
    what = (
        "A LoRA adapter for"
        if adapter
        else "The LoRA adapter of this run merged into"
        if merged
        else "A full fine-tune of"
    )
    body = [
        f"# {title}",
        "",
        f"{what} {shown_base}, trained with sftlab (supervised fine-tuning: the loss is on "
        "the assistant replies of chat data, as set by `data.loss_on`).",
        "",
        *_usage(
            repo_id or str(run_dir / "merged" if merged else run_dir),
            adapter,
            "merged" if merged and repo_id else None,
        ),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in [("base model", f"`{base}`"), *_hyperparameters(tree, info)]],
        "",
        "The full resolved configuration is `config.yaml`"
        + (" (one folder up)" if merged else "")
        + "; `report.md` and `loss.png` hold the training curves.",
        "",
        "## Data",
        "",
        *_data_lines(tree, run_dir),
        "",
        "## Results",
        "",
        *_results(run_dir),
        "",
    ]
    meta = card_metadata(run_dir, tree, adapter).to_yaml()
    return str(ModelCard(f"---\n{meta}\n---\n\n" + "\n".join(body)))


def write_model_cards(run_dir: str | Path, repo_id: str | None = None) -> list[Path]:
    """README.md into the run directory and into its merged/ model when there is one; returns the paths."""
    run_dir = Path(run_dir)
    written = []
    for merged, where in ((False, run_dir), (True, run_dir / "merged")):
        if merged and not (where / "config.json").is_file():
            continue
        (where / CARD).write_text(card_text(run_dir, repo_id, merged), encoding="utf-8")
        written.append(where / CARD)
    return written
