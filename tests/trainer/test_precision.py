"""The mixed-precision mode: what `auto` resolves to on each device, the environment override that pins it,
and the CPU's bf16 detection."""

from __future__ import annotations

import pytest
import torch

from sftlab.trainer import precision
from sftlab.trainer.precision import AUTO_ENV, cpu_has_fast_bf16, resolve_mixed_precision

# ---------------------------------------------------------------------------- mixed-precision mode


@pytest.fixture()
def cpu_bf16(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)  # these tests read what auto resolves to from the hardware

    def set_fast(fast: bool):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)

    return set_fast


def test_resolve_on_cpu(cpu_bf16):
    cpu = torch.device("cpu")
    cpu_bf16(True)
    assert resolve_mixed_precision("auto", cpu)[0] == "bf16"
    assert resolve_mixed_precision("bf16", cpu)[0] == "bf16"
    assert resolve_mixed_precision("no", cpu)[0] == "no"
    cpu_bf16(False)
    mode, reason = resolve_mixed_precision("auto", cpu)
    assert mode == "no" and "AMX" in reason
    mode, reason = resolve_mixed_precision("bf16", "cpu")
    assert mode == "bf16" and "slower" in reason
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        resolve_mixed_precision("fp16", cpu)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_mixed_precision("fp32", cpu)


def test_resolve_with_bf16_weights(cpu_bf16):
    """bf16 weights compute in bf16 anyway: auto picks bf16 even where bf16 is slow; explicit no stays no."""
    cpu_bf16(False)
    mode, reason = resolve_mixed_precision("auto", "cpu", weights_dtype="bfloat16")
    assert mode == "bf16" and "model.dtype" in reason
    assert resolve_mixed_precision("no", "cpu", weights_dtype="bfloat16")[0] == "no"
    assert resolve_mixed_precision("auto", "cpu", weights_dtype="float32")[0] == "no"


def test_resolve_on_cuda(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: True)
    assert resolve_mixed_precision("auto", cuda)[0] == "bf16"
    assert resolve_mixed_precision("fp16", cuda)[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    assert resolve_mixed_precision("auto", cuda)[0] == "no"
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_mixed_precision("bf16", cuda)
    assert all(isinstance(r, str) and r for r in resolve_mixed_precision("fp16", cuda))


def test_cpu_bf16_detection(monkeypatch, tmp_path):
    probes = {"amx_tile": False, "avx512_bf16": True}
    monkeypatch.setattr(precision.torch_compat, "cpu_supports", lambda feature: probes[feature])
    assert cpu_has_fast_bf16()
    probes["avx512_bf16"] = False
    assert not cpu_has_fast_bf16()
    # no torch probes: /proc/cpuinfo flags decide
    monkeypatch.setattr(precision.torch_compat, "cpu_supports", lambda feature: None)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx512f", "amx_bf16"})
    assert cpu_has_fast_bf16()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx512f", "avx2"})
    assert not cpu_has_fast_bf16()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.undo()
    assert {"avx512_bf16", "amx_tile"} <= precision._cpuinfo_flags(str(info))
    assert precision._cpuinfo_flags(str(tmp_path / "missing")) == set()
    assert isinstance(cpu_has_fast_bf16(), bool)  # the real machine, whatever it has


@pytest.mark.parametrize("fast", [True, False])
def test_the_environment_forces_what_auto_resolves_to(cpu_bf16, monkeypatch, fast):
    """SFTLAB_AUTO_MIXED_PRECISION pins `auto` (the suite runs both ways on any CPU); explicit settings and
    bfloat16 weights keep their meaning; a bad value is an error naming the variable."""
    cpu_bf16(fast)
    for value, want in (("bf16", "bf16"), ("no", "no"), ("fp32", "no")):
        monkeypatch.setenv(AUTO_ENV, value)
        mode, reason = resolve_mixed_precision("auto", "cpu")
        assert mode == want and AUTO_ENV in reason
        assert (
            resolve_mixed_precision("no", "cpu")[0] == "no"
            and resolve_mixed_precision("bf16", "cpu")[0] == "bf16"
        )
        assert resolve_mixed_precision("auto", "cpu", weights_dtype="bfloat16")[0] == "bf16"
    monkeypatch.setenv(AUTO_ENV, "fp8")
    with pytest.raises(ValueError, match=f"{AUTO_ENV}='fp8': expected bf16 or no"):
        resolve_mixed_precision("auto", "cpu")
