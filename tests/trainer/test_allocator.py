"""train.allocator: which library is preloaded and why, the re-execution of `sftlab train`, and a run under
tcmalloc training bitwise as one under the system allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftlab.trainer import allocator

MAPS = (
    "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    "7f02-7f03 r-xp 00000000 08:01 2 {}\n"
)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(allocator, "GPU_NODES", ())


def _lib(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(b"\x7fELF")
    return d / name


def test_the_first_directory_holding_a_library_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = _lib(b, "libtcmalloc.so.4")
    assert allocator.find_library("tcmalloc", [a, b]) == full
    minimal = _lib(a, "libtcmalloc_minimal.so.4")
    assert allocator.find_library("tcmalloc", [a, b]) == minimal
    assert allocator.find_library("jemalloc", [a, b]) is None


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/venv/lib/libtcmalloc_minimal.so.4", "tcmalloc"),
        ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
        ("/usr/lib/x86_64-linux-gnu/libm.so.6", "system"),
    ],
)
def test_the_loaded_allocator_is_read_from_the_memory_map(path, kind):
    assert allocator.loaded(MAPS.format(path)) == kind


@pytest.mark.skipif(sys.platform != "linux", reason="preloading is Linux only")
def test_auto_preloads_tcmalloc_else_jemalloc_else_nothing(tmp_path, no_gpu):
    d = tmp_path / "lib"
    library, why = allocator.plan("auto", {}, [d])
    assert library is None and "no tcmalloc found" in why
    je = _lib(d, "libjemalloc.so.2")
    assert allocator.plan("auto", {}, [d])[0] == je
    tc = _lib(d, "libtcmalloc_minimal.so.4")
    library, why = allocator.plan("auto", {}, [d])
    assert library == tc and str(tc) in why
    assert allocator.plan("jemalloc", {}, [d])[0] == je
    assert allocator.plan("system", {}, [d])[0] is None
    # the re-executed process (its environment carries the reason) never preloads again
    assert allocator.plan("auto", {allocator.CHOSEN: why}, [d]) == (None, why)


@pytest.mark.skipif(sys.platform != "linux", reason="preloading is Linux only")
def test_auto_leaves_a_gpu_host_alone_and_a_missing_named_allocator_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "lib"
    _lib(d, "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "GPU_NODES", (str(_lib(tmp_path / "dev", "nvidiactl")),))
    library, why = allocator.plan("auto", {}, [d])
    assert library is None and "GPU" in why
    assert allocator.plan("tcmalloc", {}, [d])[0] == d / "libtcmalloc_minimal.so.4"  # named: preloaded anyway
    with pytest.raises(allocator.AllocatorError, match=r"libjemalloc\.so\.2 .*apt install libjemalloc2"):
        allocator.plan("jemalloc", {}, [d])


def test_the_preload_goes_first_and_keeps_the_callers():
    env = allocator.preload_env(Path("/x/libtcmalloc_minimal.so.4"), "why", {"LD_PRELOAD": "/y/libfoo.so"})
    assert env["LD_PRELOAD"] == f"/x/libtcmalloc_minimal.so.4{os.pathsep}/y/libfoo.so"
    assert env[allocator.CHOSEN] == "why" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 30
    assert allocator.preload_env(Path("/x/l.so"), "w", {})["LD_PRELOAD"] == "/x/l.so"


def _train(model_dir: Path, data: Path, out: Path, setting: str) -> tuple[dict, list[dict], str]:
    cfg = out.with_suffix(".yaml")
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": [{"path": str(data)}], "max_seq_length": 128},
        "optim": {"lr": 3e-3},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "max_steps": 3, "allocator": setting},
    }
    cfg.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k not in (allocator.CHOSEN, "LD_PRELOAD")}
    proc = subprocess.run(
        [sys.executable, "-m", "sftlab.cli", "train", str(cfg)],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "run.json").read_text()), rows, proc.stdout


@pytest.mark.skipif(
    sys.platform != "linux" or allocator.find_library("tcmalloc") is None,
    reason="no tcmalloc here (`make setup` fetches it where apt-get works)",
)
def test_a_run_under_tcmalloc_trains_bitwise_as_the_system_allocators(tiny_model_dir, chat_file, tmp_path):
    system, system_rows, _ = _train(tiny_model_dir, chat_file, tmp_path / "system", "system")
    tc, tc_rows, log = _train(tiny_model_dir, chat_file, tmp_path / "tc", "tcmalloc")
    assert system["allocator"] == "system" and system["reasons"]["allocator"] == "system: as configured"
    assert tc["allocator"] == "tcmalloc"  # read from the process's own memory map, after the re-execution
    assert "allocator: tcmalloc (tcmalloc: tcmalloc preloaded from" in " ".join(log.split())
    keys = ("step", "loss", "grad_norm", "target_tokens")
    assert [{k: r[k] for k in keys} for r in tc_rows] == [{k: r[k] for k in keys} for r in system_rows]


def test_a_preload_that_did_not_load_is_said(monkeypatch):
    monkeypatch.setenv(allocator.CHOSEN, "auto: tcmalloc preloaded from /x/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "loaded", lambda maps=None: "system")
    kind, why = allocator.describe()
    assert kind == "system" and "did not load" in why


def test_release_free_memory_runs_under_any_allocator(monkeypatch):
    """Where the allocator has no release call (or the symbol is missing) it does nothing; under glibc it
    calls malloc_trim(0), under tcmalloc its release function."""
    calls = []

    class Lib:
        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

        def MallocExtension_ReleaseFreeMemory(self):
            calls.append(("tcmalloc",))

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Lib())
    for kind in ("system", "tcmalloc", "jemalloc"):
        monkeypatch.setattr(allocator, "loaded", lambda kind=kind: kind)
        allocator.release_free_memory()
    assert calls == [("malloc_trim", 0), ("tcmalloc",)]
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())  # no such symbol
    monkeypatch.setattr(allocator, "loaded", lambda: "system")
    allocator.release_free_memory()
