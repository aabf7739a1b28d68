"""One engine object owns what differs between engines (trainer/distributed.py: `Engine`): no module outside
it (and compat/, where Accelerate's private state is touched) tests which engine runs -- no
`distributed_type`, no FSDP/DeepSpeed plugin or engine class, no comparison with an engine's name."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sftlab"
ENGINE_MODULE = SRC / "trainer" / "distributed.py"
ENGINE_NAMES = {"single", "ddp", "fsdp", "deepspeed"}
ENGINE_TYPE_NAMES = {
    "distributed_type",
    "DistributedType",
    "deepspeed_plugin",
    "fsdp_plugin",
    "engine_of",
    "zero_stage",
    "SINGLE",
    "DDP",
    "FSDP",
    "DEEPSPEED",
    "DDPEngine",
    "ShardedEngine",
    "FSDPEngine",
    "DeepSpeedEngine",
}


def engine_checks(source: str) -> list[tuple[int, str]]:
    """(line, what) for every engine-type test in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = (
            node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        )
        if name in ENGINE_TYPE_NAMES:
            found.append((node.lineno, name))
        func = node.func if isinstance(node, ast.Call) else None
        if (
            getattr(func, "id", getattr(func, "attr", None)) == "sharded"
        ):  # the old `distributed.sharded(acc)`
            found.append((node.lineno, "sharded()"))
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [
                    (node.lineno, repr(v.value))
                    for v in values
                    if isinstance(v, ast.Constant)
                    and isinstance(v.value, str)
                    and v.value.lower() in ENGINE_NAMES
                ]
    return found


def test_no_engine_type_checks_outside_the_engine_module():
    offenders = [
        f"{path.relative_to(SRC)}:{line}: {what}"
        for path in sorted(SRC.rglob("*.py"))
        if path != ENGINE_MODULE and "compat" not in path.parts
        for line, what in engine_checks(path.read_text())
    ]
    assert not offenders, (
        "engine-type checks outside trainer/distributed.py (ask the run's Engine instead):\n"
        + "\n".join(offenders)
    )


def test_the_check_finds_what_it_forbids():
    found = engine_checks(
        "a = acc.distributed_type == DistributedType.FSDP\n"
        "b = engine.name == 'deepspeed'\n"
        "c = kind in ('ddp', 'x')\n"
        "d = acc.state.deepspeed_plugin.zero_stage\n"
        "e = distributed.sharded(acc)\n"
    )
    assert {line for line, _ in found} == {1, 2, 3, 4, 5}
    assert not engine_checks("x = run.engine.sharded\ny = engine.name\nz = {'deepspeed': 1}['deepspeed']\n")
