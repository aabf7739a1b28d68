"""Optimizers by name and the minimum-lr schedule: each trains, checkpoints and resumes exactly."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import EXACT, cfg_tree, metrics

import sftlab
from sftlab.config.schema import OptimConfig
from sftlab.trainer.optim import OptimizerError, build_optimizer, build_scheduler
from sftlab.trainer.precision import bf16_weight_form


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_min_lr_ratio_is_where_the_decay_ends(kind):
    param = torch.nn.Parameter(torch.zeros(1))
    total, floor = 50, 0.1
    lrs = {}
    for ratio in (0.0, floor):
        opt = torch.optim.SGD([param], lr=1.0)
        sched = build_scheduler(
            opt, OptimConfig(lr=1.0, warmup_steps=5, scheduler=kind, min_lr_ratio=ratio), total
        )
        seen = []
        for _ in range(total):
            seen.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        lrs[ratio] = seen
    assert lrs[floor][:6] == lrs[0.0][:6]  # warmup and the peak untouched
    assert all(
        got == pytest.approx(floor + (1 - floor) * base) for got, base in zip(lrs[floor][5:], lrs[0.0][5:])
    )
    assert min(lrs[floor]) > floor and lrs[floor][-1] < floor + 0.05


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, record):
        return record["step"] == self.step


BNB = importlib.util.find_spec("bitsandbytes") is not None
NAMES = ["sgd", "adafactor"] + (["adamw_8bit", "paged_adamw_8bit"] if BNB else [])


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_trains_and_resumes_exactly(name, precision, tiny_model_dir, chat_file, tmp_path):
    """Every optimizer trains and resumes bitwise in fp32 and under bf16 mixed precision, where the
    optimizers without fp32 master weights keep the weights fp32 under bf16 autocast."""

    def tree(out, **train):
        t = cfg_tree(tiny_model_dir, chat_file, out, max_steps=4, mixed_precision=precision, **train)
        t["optim"].update(
            name=name, momentum=0.9 if name == "sgd" else 0.0, lr=3e-2 if name == "sgd" else 3e-3
        )
        return t

    ref = sftlab.train(tree(tmp_path / "ref"))
    assert ref.history[-1]["loss"] < ref.history[0]["loss"]
    info = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert info["mixed_precision"] == precision and info["master_weights_fp32"] is False
    cut = sftlab.train(tree(tmp_path / "cut"), callbacks=[_StopAt(2)])
    assert cut.stopped
    sftlab.train(tree(tmp_path / "cut", resume="auto"))
    got, want = metrics(tmp_path / "cut"), metrics(tmp_path / "ref")
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in want]
    wa, wb = (
        load_file(tmp_path / "ref" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_picks_a_form_each_optimizer_supports():
    """AdamW keeps bf16 copies of fp32 masters; the others keep fp32 weights under autocast, and pure bf16
    (bfloat16 weights without autocast) is refused for them with both fixes named."""
    assert bf16_weight_form("bf16", "float32", "adamw")[0] == "matmul"
    assert bf16_weight_form("no", "bfloat16", "adamw")[0] == "all"
    for name in ("sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit"):
        form, why = bf16_weight_form("bf16", "float32", name)
        assert form == "none" and f"optim.name: {name} keeps no fp32 master weights" in why
        assert bf16_weight_form("bf16", "bfloat16", name)[0] == "none"
        with pytest.raises(
            ValueError, match=f"optim.name: {name}.*train.mixed_precision: bf16.*optim.name: adamw"
        ):
            bf16_weight_form("no", "bfloat16", name)
    assert bf16_weight_form("no", "float32", "sgd")[0] == "none"
    assert bf16_weight_form("bf16", "float32", "adamw", engine_casts=True)[0] == "none"


def test_an_optimizer_without_master_weights_refuses_bf16_weights(tiny_model):
    with pytest.raises(OptimizerError, match="optim.name: sgd.*model.dtype: float32"):
        build_optimizer(tiny_model.to(torch.bfloat16), OptimConfig(name="sgd"))
