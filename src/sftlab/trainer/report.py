"""The run report: `report.md` + `loss.png` in the output directory, written from the run's own files.

Everything comes from what a run leaves behind, so `sftlab report RUN_DIR` regenerates the same
report later (also for a run that was interrupted, from its metrics so far):

- metrics.jsonl (one line per logged step), run.json (what `auto` resolved to), config.yaml,
- data_report.json (per-source counts, formats, unknown fields, unused `columns` / `roles` entries, target
  share and lengths, and skipped rows, written when the run starts),
- match_eval.json (exact match before/after, with a few samples), when the run had a match evaluation,
- checkpoints/latest, when the run checkpointed.

loss.png has four panels against the optimizer step: training loss (and validation loss where
evaluated), learning rate, tokens/s, and target tokens per step.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError
from sftlab.trainer.metrics import read_metrics

REPORT, PLOT, DATA_REPORT = "report.md", "loss.png", "data_report.json"


class ReportError(SftlabError, RuntimeError):
    """The directory is not a run directory (no metrics.jsonl)."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    return read_metrics(path)


def plot(metrics: list[dict[str, Any]], out: Path) -> None:
    """Training/validation loss, learning rate, tokens/s and target tokens against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [m for m in metrics if m.get("loss") is not None]  # step 0 (eval_on_start) has no loss
    steps = [m["step"] for m in trained]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(
        steps,
        [m["loss"] for m in trained],
        label="training loss",
        marker="." if len(steps) < 40 else None,
    )
    for key in eval_keys(metrics):  # eval_loss, then each named eval set's eval/<name>_loss
        evals = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        ax.plot(*zip(*evals), label="validation loss" if key == "eval_loss" else key, marker="o")
    ax.set_yscale("log" if all(m["loss"] > 0 for m in trained) else "linear")
    ax.legend()
    for ax, key, title in (
        (axes[0][1], "lr", "learning rate"),
        (axes[1][0], "tokens_per_s", "tokens/s"),
        (axes[1][1], "target_tokens", "target tokens per step"),
    ):
        ax.plot(steps, [m.get(key) for m in trained], marker="." if len(steps) < 40 else None)
        ax.set_title(title)
    axes[0][0].set_title("loss")
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def eval_keys(metrics: list[dict[str, Any]]) -> list[str]:
    """The validation losses the records carry: eval_loss first, then named sets (eval/<name>_loss)."""
    keys = dict.fromkeys(k for m in metrics for k in m if k.startswith("eval") and k.endswith("loss"))
    return sorted(keys, key=lambda k: (k != "eval_loss", k))


def _summary(metrics: list[dict[str, Any]], info: dict[str, Any] | None, total: int | None) -> list[str]:
    last = metrics[-1] if metrics else {}
    trained = [m for m in metrics if m.get("loss") is not None]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    rows = [
        ("optimizer steps", f"{last.get('step', 0)}" + (f" of {total}" if total else "")),
        ("epochs", f"{last.get('epoch', 0):.2f}"),
        (
            "first / last training loss",
            f"{trained[0]['loss']:.4f} / {trained[-1]['loss']:.4f}" if trained else "-",
        ),
        ("last / best validation loss", f"{evals[-1]:.4f} / {min(evals):.4f}" if evals else "-"),
        *[
            (f"last / best {key}", _last_best(metrics, key))
            for key in eval_keys(metrics)
            if key != "eval_loss"
        ],
        ("target tokens trained", f"{sum(m.get('target_tokens', 0) for m in metrics):,}"),
    ]
    for key, name in (
        ("tokens_per_s", "tokens/s (median step)"),
        ("target_tokens_per_s", "target tokens/s"),
        ("mfu", "MFU"),
        ("padding", "padding share"),
    ):
        values = [m[key] for m in metrics if m.get(key) is not None]
        if values:
            v = statistics.median(values)
            rows.append((name, f"{v:.1%}" if key in ("mfu", "padding") else f"{v:,.0f}"))
    if info:
        rows += [
            ("precision", f"{info.get('mixed_precision')} (weights {info.get('weights_dtype')})"),
            ("loss head", str(info.get("loss_head"))),
            ("device", f"{info.get('device')} x{info.get('num_processes')}"),
        ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _last_best(metrics: list[dict[str, Any]], key: str) -> str:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return f"{values[-1]:.4f} / {min(values):.4f}"


def _data_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["(no data report recorded)"]
    out = ["```", data["summary"], "```"]
    if data.get("bad_reasons"):
        out += ["", "Skipped rows by reason:", ""] + [f"- {n} x {r}" for r, n in data["bad_reasons"].items()]
    if data.get("bad_examples"):
        out += ["", "First skipped rows:", ""] + [f"- `{e}`" for e in data["bad_examples"]]
    if data.get("unknown_fields"):
        note = (
            "Fields no reader of the row format uses (ignored; map them with the source's `columns` if they "
            "hold data, docs/data.md):"
        )
        out += ["", note, ""]
        out += [
            f"- {source}: " + ", ".join(f"`{k}` ({n} rows)" for k, n in fields.items())
            for source, fields in data["unknown_fields"].items()
        ]
    if data.get("unused_mapping"):
        out += [
            "",
            "Entries of a source's `columns` / `roles` that no row uses (check the names against the "
            "file's own):",
            "",
        ]
        out += [f"- {source}: " + "; ".join(entries) for source, entries in data["unused_mapping"].items()]
    return out


def _match_section(match: dict[str, Any] | None) -> list[str]:
    if not match:
        return ["(no match evaluation configured: `match_eval.path`)"]

    def acc(r):  # noqa: E306
        return "-" if not r else f"{r['correct']}/{r['total']} = {r['accuracy']:.1%}"

    out = [
        f"Exact match of greedy replies: before training {acc(match.get('before'))}, "
        f"after {acc(match.get('after'))}."
    ]
    samples = match.get("samples_after") or []
    if samples:
        out += ["", "| prompt | reference | reply |", "|---|---|---|"]
        out += [f"| {_cell(p)} | {_cell(r)} | {_cell(g)} |" for p, r, g in samples]
    return out


def _samples_section(metrics: list[dict[str, Any]]) -> list[str]:
    """The replies train.sample_every generated, at the first and the last step that has them."""
    sampled = [m for m in metrics if m.get("samples")]
    if not sampled:
        return ["(no samples: `train.sample_every`)"]
    out: list[str] = []
    for record in [sampled[0]] if len(sampled) == 1 else [sampled[0], sampled[-1]]:
        out += [f"Step {record['step']}:", "", "| prompt | reference | reply |", "|---|---|---|"]
        out += [
            f"| {_cell(s.get('prompt', ''))} | {_cell(s.get('reference', ''))} "
            f"| {_cell(s.get('reply', s.get('note', '')))} |"
            for s in record["samples"]
        ]
        out.append("")
    return out[:-1]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:120]


def write_report(run_dir: str | Path, status: str | None = None) -> Path:
    """Write report.md and loss.png into `run_dir` from its files; returns the report's path."""
    run_dir = Path(run_dir)
    metrics = _metrics(run_dir)
    info = _read_json(run_dir / "run.json")
    config = (
        (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    )
    total = (info or {}).get("total_steps")
    if status is None:
        done = (run_dir / "model.safetensors").is_file() or (run_dir / "adapter_model.safetensors").is_file()
        status = "finished" if done else "not finished (interrupted or running)"
    latest = run_dir / "checkpoints" / "latest"
    lines = [
        f"# sftlab run report: {run_dir.name}",
        "",
        f"Status: {status}."
        + (f" Latest checkpoint: `checkpoints/{latest.read_text().strip()}`." if latest.is_file() else ""),
        "",
    ]
    if metrics:
        plot(metrics, run_dir / PLOT)
        lines += [f"![loss, learning rate, throughput]({PLOT})", ""]
    lines += [
        "## Summary",
        "",
        *_summary(metrics, info, total),
        "",
        "## Data",
        "",
        *_data_section(_read_json(run_dir / DATA_REPORT)),
        "",
        "## Exact-match evaluation",
        "",
        *_match_section(_read_json(run_dir / "match_eval.json")),
        "",
        "## Samples",
        "",
        *_samples_section(metrics),
        "",
        "## Configuration (resolved)",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
    ]
    path = run_dir / REPORT
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
