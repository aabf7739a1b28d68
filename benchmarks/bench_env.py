"""What bench_train.py reports about the machine and the model, and the models it can build.

- `machine_lines(device)`: the CPU model and whether it has the bf16 matmul instructions autocast needs
  to be fast (AVX512-BF16, AMX), from /proc/cpuinfo's flags; the GPU and its memory on CUDA.
- `resolve_model(spec, work, default_path)`: `--model`: a local Hugging Face model directory (as is), a
  preset name (`random-1b`), or a JSON file of config keys; the last two build a randomly initialised
  model of that shape on SmolLM2-135M-Instruct's config and tokenizer (vocabulary, special tokens, chat
  template, rope), saved to `work/model` in float32 -- a model of another size to time, not to learn with.
- `matmul_params(path)`: the N of "6N FLOPs per token" (sftlab's `dense_params`, on the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path

# A Llama-3.2-1B-shaped decoder on SmolLM2's vocabulary (49 152): ~1.07 B parameters, tied embeddings.
PRESETS = {
    "random-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (("unknown", {}) where there is none)."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown":
                name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            if name != "unknown" and flags:
                break
    except OSError:
        pass
    return name, flags


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16), which bf16 autocast needs to pay."""
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_lines(device: str) -> list[str]:
    import torch

    name, flags = cpu_info()
    has = lambda f: "yes" if f in flags else "no"  # noqa: E731
    bf16_fast = "avx512_bf16" in flags or "amx_bf16" in flags
    lines = [
        f"CPU: {name}; AVX512F {has('avx512f')}, AVX512-BF16 {has('avx512_bf16')}, "
        f"AMX {has('amx_tile')} (amx_bf16 {has('amx_bf16')}): bf16 matmuls "
        + ("in hardware" if bf16_fast else "without hardware support (no AVX512-BF16/AMX)")
    ]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s), "
            f"CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    return lines


def resolve_model(spec: str | None, work: Path, default_path: str) -> tuple[str, str]:
    """(model directory, its description) for `--model` (None: the embedded SmolLM2-135M-Instruct)."""
    if spec is None:
        return default_path, "SmolLM2-135M-Instruct (embedded)"
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), str(path)
    if spec in PRESETS:
        shape = PRESETS[spec]
    elif path.suffix == ".json" and path.is_file():
        shape = json.loads(path.read_text())
    else:
        raise SystemExit(
            f"--model {spec}: not a model directory, a preset ({', '.join(PRESETS)}) or a .json config"
        )
    out = work / "model"
    n = build_random_model(shape, default_path, out)
    return str(out), f"{spec}: random init, {n / 1e6:.0f}M parameters, SmolLM2's tokenizer ({out})"


def build_random_model(shape: dict, base_path: str, out: Path) -> int:
    """A randomly initialised model of `shape` (config keys over SmolLM2's config), float32, seed 0, with
    SmolLM2's tokenizer, saved to `out`; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(base_path)
    for key, value in shape.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def matmul_params(path: str) -> int:
    """Parameters that take part in matmuls (sftlab's accounting: no embedding lookups, a tied head once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.trainer.throughput import dense_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return dense_params(model)
