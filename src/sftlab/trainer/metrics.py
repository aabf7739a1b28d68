"""Run metrics: one JSON line per logged step in `metrics.jsonl`, and a readable console line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console


class MetricsLog:
    def __init__(self, path: Path, console: Console | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.console = console or Console()
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Start the file afresh (new run) or from a checkpoint's records (resumed run)."""
        if not self.enabled:
            return
        with open(self.path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(_public(r)) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_public(record)) + "\n")

    def show(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.enabled:
            return
        parts = [f"step {record['step']:>5}/{total_steps}", f"epoch {record['epoch']:.2f}"]
        named = [(k, ".4f") for k in record if k.startswith("eval/")]  # named eval sets: eval/<name>_loss
        for key, fmt in (
            ("loss", ".4f"),
            ("eval_loss", ".4f"),
            *named,
            ("lr", ".2e"),
            ("grad_norm", ".3f"),
            ("tokens_per_s", ".0f"),
            ("mfu", ".1%"),
            ("target_tokens", "d"),
        ):
            if (
                key in record
                and record[key] is not None
                and not (isinstance(record[key], float) and math.isnan(record[key]))
            ):
                parts.append(f"{key} {record[key]:{fmt}}")
        self.console.print("  ".join(parts), highlight=False)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when there is none)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "logged"}
