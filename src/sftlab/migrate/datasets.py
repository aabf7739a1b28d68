"""The datasets of `sftlab convert-config`: TRL/alignment-handbook hub ids, axolotl `datasets:` entries and
LLaMA-Factory `dataset:` names (through dataset_info.json) become sftlab sources with format, columns, roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftlab.migrate.values import Conversion

HUB_NOTE = (
    "# note: data sources that are not local files are hub dataset ids, loaded with "
    "datasets.load_dataset(path, subset, split); replace them with local files to train offline"
)
AXOLOTL_TYPES = {
    "alpaca": "alpaca",
    "sharegpt": "sharegpt",
    "chat_template": "messages",
    "completion": "text",
    "input_output": None,
}


def trl_datasets(c: Conversion, raw: dict) -> None:
    """TRL's dataset_name (+ dataset_config/_train_split/_test_split), alignment-handbook's dataset_mixer /
    dataset_mixture: hub ids become source paths."""
    if raw.get("dataset_name"):
        subset = raw.get("dataset_config") or (raw.get("dataset_configs") or [None])[0]
        src = {
            "path": raw["dataset_name"],
            "split": raw.get("dataset_train_split", "train"),
            "subset": subset,
        }
        c.sources.append(src)
        if raw.get("dataset_test_split") and raw.get("eval_strategy", "no") != "no":
            c.eval_sources.append({**src, "split": raw["dataset_test_split"]})
    splits = raw.get("dataset_splits") or ["train"]
    for name, frac in (raw.get("dataset_mixer") or {}).items():
        for split in splits:
            src = {"path": name, "split": split, "weight": None if float(frac) == 1.0 else float(frac)}
            (c.eval_sources if "test" in split else c.sources).append(src)
    mixture = raw.get("dataset_mixture") or {}
    for d in mixture.get("datasets") or []:
        weight = float(d.get("weight", 1.0))
        c.sources.append(
            {
                "path": d["id"],
                "subset": d.get("config"),
                "split": d.get("split", "train"),
                "weight": None if weight == 1.0 else weight,
            }
        )
    if mixture.get("test_split_size"):
        c.set("data.eval_fraction", float(mixture["test_split_size"]))
    field = raw.get("dataset_text_field")
    if field and field != "text":
        for src in c.sources + c.eval_sources:
            src["columns"] = {"text": field}
    if c.sources:
        c.notes.append(HUB_NOTE)


def _axolotl_source(c: Conversion, d: dict, i: int) -> dict | None:
    kind = str(d.get("type", "alpaca"))
    fmt = AXOLOTL_TYPES.get(kind.split(":")[0])
    if fmt is None:
        c.skip(f"datasets[{i}].type", kind, "formats: alpaca, sharegpt, chat_template, completion")
    src: dict[str, Any] = {"path": d.get("data_files") or d["path"], "format": fmt or "auto"}
    if isinstance(src["path"], list):
        src["path"] = src["path"][0]
    if d.get("name"):
        src["subset"] = d["name"]
    if d.get("split"):
        src["split"] = d["split"]
    columns = {
        "messages": d.get("field_messages"),
        "role": d.get("message_field_role"),
        "content": d.get("message_field_content"),
        **(d.get("message_property_mappings") or {}),
    }
    if fmt == "text" and d.get("field"):
        columns["text"] = d["field"]
    src["columns"] = {k: v for k, v in columns.items() if v and v != k}
    roles = {
        alias: role
        for role, aliases in (d.get("roles") or {}).items()
        for alias in aliases or []
        if alias != role and role in ("system", "user", "assistant", "tool")
    }
    if roles:
        src["roles"] = roles
    if fmt == "messages" and d.get("roles_to_train") not in (None, ["assistant"]):
        c.skip(f"datasets[{i}].roles_to_train", d["roles_to_train"], "data.loss_on decides which turns train")
    return src


def axolotl_datasets(c: Conversion, raw: dict) -> None:
    for key, into in (("datasets", c.sources), ("test_datasets", c.eval_sources)):
        for i, d in enumerate(raw.get(key) or []):
            into.append(_axolotl_source(c, d, i))
    if any(not Path(s["path"]).exists() for s in c.sources):
        c.notes.append(HUB_NOTE)


LF_ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
LF_SHAREGPT = {"messages": "conversations", "system": "system", "tools": "tools"}
LF_TAGS = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "assistant",
}


def _lf_info(c: Conversion, raw: dict) -> tuple[dict, str]:
    folder = str(raw.get("dataset_dir", "data"))
    for base in (Path.cwd(), c.base):
        info = base / folder / "dataset_info.json"
        if info.is_file():
            return json.loads(info.read_text(encoding="utf-8")), folder
    c.notes.append(
        f"# note: {folder}/dataset_info.json not found (next to the config or here): datasets are kept "
        "as named; give each source its path, format and columns"
    )
    return {}, folder


def _lf_source(c: Conversion, name: str, entry: dict, folder: str) -> dict:
    if not entry:
        c.notes.append(f"# note: dataset {name!r} is not in {folder}/dataset_info.json: its path is its name")
        return {"path": name}
    path = entry.get("file_name") and f"{folder}/{entry['file_name']}" or entry.get("hf_hub_url")
    if path is None:
        c.skip(
            f"dataset {name}",
            entry.get("ms_hub_url") or entry.get("script_url"),
            "only files and HF hub datasets",
        )
        path = name
    fmt = entry.get("formatting", "alpaca")
    src: dict[str, Any] = {
        "path": path,
        "name": name,
        "format": fmt if fmt in ("alpaca", "sharegpt") else "auto",
    }
    for key in ("split", "subset"):
        if entry.get(key):
            src[key] = entry[key]
    if isinstance(entry.get("num_samples"), int) and entry["num_samples"] > 1:
        src["weight"] = entry["num_samples"]
    ours = LF_ALPACA if fmt == "alpaca" else LF_SHAREGPT
    columns: dict[str, str] = {}
    for theirs, field in (entry.get("columns") or {}).items():
        if theirs in ours:
            columns[ours[theirs]] = field
        else:
            c.skip(f"dataset {name} columns.{theirs}", field, "no such field in sftlab's rows")
    tags = entry.get("tags") or {}
    columns.update({k: tags[t] for k, t in (("from", "role_tag"), ("value", "content_tag")) if t in tags})
    src["columns"] = {k: v for k, v in columns.items() if v != k}
    src["roles"] = {tags[t]: role for t, role in LF_TAGS.items() if t in tags and tags[t] != role}
    if entry.get("ranking"):
        c.skip(f"dataset {name}", "ranking: true", "preference data; sftlab trains SFT")
    return src


def lf_datasets(c: Conversion, raw: dict) -> None:
    info, folder = _lf_info(c, raw)
    for key, into in (("dataset", c.sources), ("eval_dataset", c.eval_sources)):
        names = raw.get(key) or []
        for name in names.split(",") if isinstance(names, str) else names:
            into.append(_lf_source(c, name.strip(), info.get(name.strip(), {}), folder))
