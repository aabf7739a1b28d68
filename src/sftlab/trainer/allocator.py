"""The host memory allocator a CPU run's tensors come from (`train.allocator`).

glibc's malloc fragments under a training step's pattern: each layer's transient tensors (megabytes) are
freed while small long-lived C++ objects (autograd nodes, tensor headers) are carved out of the holes they
leave, so the next layer's transients no longer fit there and land on fresh pages. The heap grows by the
transients of every layer of a forward although what is live stays flat (measured: 450 MB of free heap held
during a LoRA step of SmolLM2 at 1x1024, and every such page is faulted in again). tcmalloc (gperftools)
and jemalloc keep size classes apart; PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) preloads
tcmalloc for this reason. An allocator can only be chosen before the process starts (LD_PRELOAD), so
`sftlab train` re-executes itself once with it preloaded (same process id, arguments and environment
otherwise); `sftlab.train(...)` from Python runs under whatever the interpreter started with and says so.

Light: imports nothing heavy (the CLI calls it before torch is imported). Linux only; elsewhere `auto`
means the system allocator.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from sftlab.errors import SftlabError

LIBRARIES = {  # the file names each allocator ships under, the most specific first
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
INSTALL = {
    "tcmalloc": "apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, or conda "
    "install -c conda-forge gperftools; `make setup` puts Debian's copy in .venv/lib without root",
    "jemalloc": "apt install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc, or conda install -c "
    "conda-forge jemalloc",
}
CHOSEN = "SFTLAB_ALLOCATOR"  # set before the re-execution: the reason, read back by `describe` (run.json)
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd")  # a CUDA / ROCm device on this host: the run is not a CPU run


class AllocatorError(SftlabError, RuntimeError):
    """train.allocator names an allocator this machine does not have."""


def search_dirs() -> list[Path]:
    """Where the allocator's library is looked for: this environment's lib first (`make setup` puts
    Debian's tcmalloc there), then the user's and the system's library directories."""
    dirs = [Path(sys.prefix) / "lib", Path.home() / ".local" / "lib", Path("/usr/local/lib")]
    dirs += [Path("/usr/local/lib64"), Path("/usr/lib64"), Path("/usr/lib")]
    dirs += sorted(Path("/usr/lib").glob("*-linux-gnu*"))  # Debian's multiarch directories
    return dirs


def find_library(kind: str, dirs: list[Path] | None = None) -> Path | None:
    """The first file of `kind`'s library in `dirs` (default `search_dirs()`), else None."""
    for d in search_dirs() if dirs is None else dirs:
        for name in LIBRARIES[kind]:
            if (d / name).is_file():
                return d / name
    return None


def loaded(maps: str | None = None) -> str:
    """The allocator this process runs under: tcmalloc or jemalloc when its library is mapped
    (`maps`: the text of /proc/self/maps, read when None), else "system"."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "system"
    for kind in LIBRARIES:
        if f"lib{kind}" in maps:
            return kind
    return "system"


def plan(setting: str, env: dict[str, str], dirs: list[Path] | None = None) -> tuple[Path | None, str]:
    """(the library to preload, or None; why) for `train.allocator: setting` in a process whose
    environment is `env`. Raises AllocatorError where an allocator named outright is not installed."""
    if setting == "system":
        return None, "system: as configured"
    if sys.platform != "linux":
        return None, f"system: {setting} is preloaded on Linux only"
    if CHOSEN in env:  # this process is the re-execution (or its child): never twice
        return None, env[CHOSEN]
    kinds = ("tcmalloc", "jemalloc") if setting == "auto" else (setting,)
    if setting == "auto" and any(os.path.exists(node) for node in GPU_NODES):
        return None, "auto: system on a host with a GPU (tcmalloc is measured on CPU runs only)"
    for kind in kinds:
        library = find_library(kind, dirs)
        if library is not None:
            return library, f"{setting}: {kind} preloaded from {library}"
    if setting != "auto":
        raise AllocatorError(
            f"train.allocator: {setting}: no {LIBRARIES[setting][0]} in {', '.join(map(str, dirs or search_dirs()))}; "
            f"install it ({INSTALL[setting]}) or set train.allocator: auto"
        )
    return (
        None,
        f"auto: system (no tcmalloc found; faster and smaller CPU steps with it: {INSTALL['tcmalloc']})",
    )


def preload_env(library: Path, why: str, env: dict[str, str]) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD and the reason recorded; tcmalloc's report of large
    allocations (a line on stderr for each tensor over 1 GB) off unless set."""
    new = dict(env)
    new["LD_PRELOAD"] = os.pathsep.join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    new[CHOSEN] = why
    new.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return new


_decided: list[str] = []  # the reason `reexec_with` found nothing to preload (this process only)


def reexec_with(setting: str) -> None:
    """Re-execute this command (`sys.orig_argv`: only for a process started as `sftlab train`) with the
    allocator `setting` resolves to preloaded; returns where nothing is to be preloaded, keeping why."""
    library, why = plan(setting, dict(os.environ))
    if library is None:
        _decided[:] = [why]
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(library, why, dict(os.environ))
    )


def describe() -> tuple[str, str]:
    """(the allocator this process runs under, why): for run.json and the start line."""
    kind = loaded()
    why = os.environ.get(CHOSEN) or (_decided[0] if _decided else None)
    if why is not None and " preloaded from " in why and kind == "system":
        why += ", but it did not load (the dynamic loader ignored it: another architecture or a broken file?)"
    if why is None:  # the Python API (no re-execution possible) or a preload made outside sftlab
        why = (
            "preloaded by the environment"
            if kind != "system"
            else (
                "the interpreter's own (sftlab.train from Python cannot preload one; `sftlab train` does, or "
                "start Python with LD_PRELOAD)"
            )
        )
    return kind, why


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the kernel (tcmalloc: `MallocExtension_ReleaseFreeMemory`; glibc:
    `malloc_trim`; a no-op elsewhere). Called when training ends: the pages the steps freed but the allocator
    kept would otherwise stay resident while saving and the report (the loss plot's library, the state dict)
    allocate more on top of them (SmolLM2 LoRA 1x1024, 6 steps: +30 MB of peak RSS after the last step)."""
    kind = loaded()
    symbol = {"tcmalloc": "MallocExtension_ReleaseFreeMemory", "system": "malloc_trim"}.get(kind)
    if symbol is None:
        return
    try:
        release = getattr(ctypes.CDLL(None), symbol)
    except (OSError, AttributeError):  # not glibc / an allocator build without it
        return
    if kind == "system":
        release(0)
    else:
        release()
