"""Private API of other libraries is touched in src/sftlab/compat/ only (one module per library), and compat
imports no sftlab module. Scans the source's syntax trees (code, not docstrings or comments) outside compat/
for: the private names sftlab is known to touch, any import of a private name from another library, any
`obj._name` / `getattr(obj, "_name")` / `f(_name=...)` whose `_name` sftlab does not define itself, and
writes to attributes that belong to another library's object."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sftlab"
COMPAT = SRC / "compat"

# Every private touch compat/ wraps (tests/compat/test_<library>.py checks each against the installed version).
KNOWN = (
    "_render_with_assistant_indices",
    "_compile_jinja_template",  # transformers
    "root_render_func",
    "new_context",  # jinja
    "_apply_liger_kernel_to_instance",  # liger
    "_reset_state",
    "_shared_state",
    "_models",  # accelerate
    "_fingerprint",  # datasets
    "_C",
    "_cpu",
    "_is_amx_tile_supported",
    "_is_avx512_bf16_supported",
    "_orig_mod",
    "_version",  # torch
    "_raise_exceptions_for_missing_entries",
    "_raise_exceptions_for_connection_errors",
    "PROCESSOR_MAPPING",
    "processor_class_from_name",
    "_get_arguments_from_pretrained",
    "_attn_implementation",
    "_no_split_modules",
    "hf_quantizer",  # transformers
)
# Attributes of other libraries' objects that sftlab reads but must not write outside compat/.
NOT_WRITTEN = ("distributed_type", "fsdp_plugin", "forward", "hf_quantizer")
# Underscore names that are public API (namedtuple, enum, os).
PUBLIC_UNDERSCORED = {
    "_asdict",
    "_replace",
    "_fields",
    "_make",
    "_field_defaults",
    "_missing_",
    "_value_",
    "_name_",
    "_generate_next_value_",
    "_exit",
}
_KNOWN_IN_TEXT = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, KNOWN)) + r")(?!\w)")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(SRC.rglob("*.py"))}


def _outside_compat(trees: dict[Path, ast.Module]) -> dict[Path, ast.Module]:
    return {p: t for p, t in trees.items() if COMPAT not in p.parents}


def _defined_by_sftlab(trees: dict[Path, ast.Module]) -> set[str]:
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
    return names


def _statement_strings(tree: ast.Module) -> set[int]:
    """ids of docstrings and other bare string statements (text, not code)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _known_touches(tree: ast.Module) -> list[tuple[int, str]]:
    text = _statement_strings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in KNOWN:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in KNOWN:
            found.append((getattr(node, "lineno", 0), f"import {node.name}"))
        elif isinstance(node, ast.keyword) and node.arg in KNOWN:
            found.append((node.value.lineno, f"{node.arg}="))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in text:
            found += [(node.lineno, repr(m.group(1))) for m in _KNOWN_IN_TEXT.finditer(node.value)]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found += [
                (node.lineno, f"writes .{t.attr}")
                for t in targets
                if isinstance(t, ast.Attribute) and t.attr in NOT_WRITTEN
            ]
    return found


def _unknown_private(tree: ast.Module, ours: set[str]) -> list[tuple[int, str]]:
    def foreign(name: str) -> bool:
        return _private(name) and name not in ours and name not in PUBLIC_UNDERSCORED

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and foreign(node.attr):
            found.append((node.lineno, f".{node.attr}"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and not node.module.startswith("sftlab")
            and node.module != "__future__"
        ):
            found += [
                (node.lineno, f"from {node.module} import {a.name}")
                for a in node.names
                if _private(a.name) or any(_private(part) for part in node.module.split("."))
            ]
        elif isinstance(node, ast.keyword) and node.arg and foreign(node.arg):
            found.append((node.value.lineno, f"{node.arg}="))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and foreign(node.args[1].value)
        ):
            found.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
    return found


def _report(hits: dict[Path, list[tuple[int, str]]]) -> str:
    return "\n".join(
        f"{p.relative_to(SRC.parent)}:{line}: {what}" for p, found in hits.items() for line, what in found
    )


def test_known_private_touches_live_in_compat_only():
    hits = {p: f for p, t in _outside_compat(_trees()).items() if (f := _known_touches(t))}
    assert not hits, "private API of another library outside sftlab/compat/ (wrap it there):\n" + _report(
        hits
    )


def test_no_other_private_name_of_another_library_outside_compat():
    trees = _trees()
    ours = _defined_by_sftlab(trees)
    hits = {p: f for p, t in _outside_compat(trees).items() if (f := _unknown_private(t, ours))}
    assert not hits, (
        "private names that sftlab does not define, outside sftlab/compat/ (wrap them there):\n"
        + _report(hits)
    )


def test_the_scan_finds_what_it_looks_for():
    """The checks above are not vacuous: each kind of touch in a snippet is found."""
    snippet = ast.parse(
        "from transformers.utils.chat_template_utils import _compile_jinja_template\n"
        "x = model._no_split_modules\n"
        "y = getattr(ds, '_fingerprint', None)\n"
        "z = {k.removeprefix('_orig_mod.'): v for k, v in w.items()}\n"
        "accelerator.state.distributed_type = 1\n"
        "cached_file(p, n, _raise_exceptions_for_missing_entries=False)\n"
        "t = tensor._version + torch._C._cpu\n"
    )
    known = {what for _, what in _known_touches(snippet)}
    assert {
        "import _compile_jinja_template",
        "._no_split_modules",
        "'_fingerprint'",
        "'_orig_mod'",
        "writes .distributed_type",
        "_raise_exceptions_for_missing_entries=",
        "._version",
        "._C",
        "._cpu",
    } <= known
    unknown = {what for _, what in _unknown_private(snippet, ours=set())}
    assert {
        "._no_split_modules",
        "getattr(..., '_fingerprint')",
        "._version",
        "._C",
        "._cpu",
        "_raise_exceptions_for_missing_entries=",
    } <= unknown


def test_compat_imports_no_sftlab_module():
    found = [
        f"{p.relative_to(SRC.parent)}:{n.lineno}"
        for p, t in _trees().items()
        if COMPAT in p.parents
        for n in ast.walk(t)
        if (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sftlab"))
        or (isinstance(n, ast.Import) and any(a.name.startswith("sftlab") for a in n.names))
    ]
    assert not found, "sftlab/compat/ is layer 0: it imports no sftlab module:\n" + "\n".join(found)
