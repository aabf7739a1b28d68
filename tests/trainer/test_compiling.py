"""train.compile: the auto decision, fixed-shape packed batches, and a compiled run against an eager one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sftlab.data.packing import PackedRow, packed_collate
from sftlab.model.loss import TargetLossHead
from sftlab.trainer import compiling
from sftlab.trainer.checkpoint import latest_checkpoint, read_state
from sftlab.trainer.loop import run_training
from tests.conftest import build_model
from tests.trainer.test_loop import make_cfg

LONG = compiling.RunShape(
    setting="auto",
    packed=True,
    fixed_batches=True,
    vision=False,
    sharded=False,
    resumed_compiled=None,
    remaining_tokens=10**9,
    flops_per_token=6 * 135e6,
    peak_flops=150e9,
    device_type="cuda",
)


def test_auto_compiles_a_long_packed_run_and_not_a_short_one():
    on, why = compiling.decide(LONG)
    assert on and "assumed" in why and "model FLOPs / matmul probe" in why
    # 6 x 135M FLOPs/token at 150 GFLOP/s: 5.4 ms/token; a 1.2x gain saves 0.9 ms/token, so 60 s x 1.5
    # of compiling needs 100k tokens
    assert not compiling.decide(dataclasses.replace(LONG, remaining_tokens=80_000))[0]
    assert compiling.decide(dataclasses.replace(LONG, remaining_tokens=120_000))[0]


def test_a_cpu_compiles_only_once_a_gain_was_measured_there():
    cpu = dataclasses.replace(LONG, device_type="cpu")
    on, why = compiling.decide(cpu)
    assert not on and "no gain known" in why and "compile: true" in why
    measured = {"eager_s_per_token": 1e-3, "compiled_s_per_token": 0.8e-3, "compile_s": 100.0}
    assert compiling.decide(cpu, measured)[0]


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"packed": False}, "not packed"),
        ({"fixed_batches": False}, "micro_batch_tokens"),
        ({"vision": True}, "image"),
        ({"sharded": True}, "FSDP"),
        ({"peak_flops": None}, "no step-time estimate"),
    ],
)
def test_auto_stays_off_where_shapes_vary_or_nothing_is_known(change, reason):
    on, why = compiling.decide(dataclasses.replace(LONG, **change))
    assert not on and reason in why


def test_measured_records_replace_the_assumptions():
    slower = {"eager_s_per_token": 1e-3, "compiled_s_per_token": 1.1e-3, "compile_s": 10.0}
    on, why = compiling.decide(LONG, slower)
    assert not on and "measured" in why  # compiling was measured slower here: never pays
    faster = {"eager_s_per_token": 1e-3, "compiled_s_per_token": 0.5e-3, "compile_s": 30.0}
    assert compiling.decide(dataclasses.replace(LONG, remaining_tokens=100_000), faster)[
        0
    ]  # saves 50 s >= 45 s
    assert not compiling.decide(dataclasses.replace(LONG, remaining_tokens=80_000), faster)[0]  # 40 s < 45 s


def test_a_resumed_run_does_what_its_checkpoint_did_and_settings_win():
    assert compiling.decide(dataclasses.replace(LONG, resumed_compiled=False)) == (
        False,
        "auto: as the run this one resumes did",
    )
    assert compiling.decide(dataclasses.replace(LONG, remaining_tokens=1, resumed_compiled=True))[0]
    assert compiling.decide(dataclasses.replace(LONG, setting=False))[0] is False
    assert compiling.decide(dataclasses.replace(LONG, setting=True, packed=False))[0] is True


def test_records_fold_steady_step_times(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_COMPILE_TIMES", str(tmp_path / "times.json"))
    assert compiling.update_record("k", False, [3.0, 1.0, 1.0], 100) is None  # too few steps to know
    compiling.update_record("k", False, [3.0, 2.5, 1.0, 1.2, 1.1], 1000)
    record = compiling.update_record("k", True, [60.0, 1.0, 0.5, 0.6, 0.4], 1000)
    assert record == pytest.approx(
        {"eager_s_per_token": 1.1e-3, "compiled_s_per_token": 0.5e-3, "compile_s": 59.5}
    )
    assert json.loads((tmp_path / "times.json").read_text())["k"] == record


def test_fixed_shape_batches_keep_the_loss_and_gradients():
    """Rows padded to the packing length and the batch to micro_batch_size rows: same loss sum and
    gradients as the batch at its natural shape (padding is a separate document with no targets)."""
    model = build_model(400)
    head = TargetLossHead.for_model(model)
    g = torch.Generator().manual_seed(0)

    def row(*lengths):
        ids = torch.randint(3, 400, (sum(lengths),), generator=g).tolist()
        labels = [-100 if i in {0, lengths[0]} else t for i, t in enumerate(ids)]
        return PackedRow(ids, labels, list(lengths))

    rows = [row(20, 31), row(17)]
    results = []
    for batch in (packed_collate(rows, pad_id=2), compiling.fixed_shape_collate(2, 64, 4)(rows)):
        model.zero_grad()
        loss = head(model, batch)
        loss.backward()
        results.append((batch["input_ids"].shape, loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == (2, 51) and results[1][0] == (4, 64)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="fixed width 40"):
        compiling.fixed_shape_collate(2, 40, 4)(rows)


@pytest.mark.parametrize(
    ("precision", "rel", "packed_attention"),
    [("no", 1e-5, "mask"), ("bf16", 2e-2, "mask"), ("no", 1e-5, "documents")],
)
def test_compiled_packed_run_matches_eager_and_compiles_once(
    tiny_model_dir, chat_file, tmp_path, precision, rel, packed_attention
):
    """The compiled step (aot_eager: the graph torch.compile captures, without inductor's minutes of code
    generation on a CPU) gives the eager losses, with one training graph for every step (the last
    micro-batch short of rows included), and the run records what it measured. fp32: at 1e-5. bf16 (autocast
    with bf16 matmul weights): at 2e-2, a few bf16 ulps (2**-8 = 3.9e-3 each) of the loss, since the graph may
    order the bf16 ops differently from eager. Per-document attention (one operator while compiling) too: its
    compiled losses are the eager per-document ones, one graph whatever the micro-batches' document layouts."""
    from torch._dynamo.utils import counters

    histories = {}
    for compile_setting in (False, True):
        cfg = make_cfg(
            tiny_model_dir,
            chat_file,
            tmp_path / f"compile-{compile_setting}",
            max_steps=4,
            micro_batch_size=3,
            compile=compile_setting,
            compile_backend="aot_eager",
            packed_attention=packed_attention,
            mixed_precision=precision,
        )
        cfg.data.packing = "bfd"
        cfg.data.max_seq_length = 128
        cfg.checkpoint.every_steps = 4
        counters.clear()
        torch._dynamo.reset()
        histories[compile_setting] = run_training(cfg).history
        assert _resolved(tmp_path / f"compile-{compile_setting}")["packed_attention"] == packed_attention
        run_json = json.loads((tmp_path / f"compile-{compile_setting}" / "run.json").read_text())
        assert run_json["compile"] is compile_setting
        assert (
            read_state(latest_checkpoint(tmp_path / f"compile-{compile_setting}")).compiled is compile_setting
        )
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    eager, compiled = histories[False], histories[True]
    assert [r["target_tokens"] for r in eager] == [r["target_tokens"] for r in compiled]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)
        assert b.get("eval_loss", 0.0) == pytest.approx(a.get("eval_loss", 0.0), rel=rel)
    records = json.loads(compiling.records_path().read_text())
    assert any({"eager_s_per_token", "compiled_s_per_token", "compile_s"} <= set(r) for r in records.values())


def _resolved(run_dir):
    return json.loads((run_dir / "run.json").read_text())


def test_whole_step_picks_the_fastest_measured_option_with_its_compile_time():
    shape = dataclasses.replace(LONG, device_type="cpu", remaining_tokens=1_000_000)
    records = {
        "documents": {"eager_s_per_token": 1.0e-3, "compiled_s_per_token": 0.7e-3, "compile_s": 100.0},
        "mask": {"eager_s_per_token": 1.2e-3, "compiled_s_per_token": 0.8e-3, "compile_s": 100.0},
    }
    mode, compiled, why = compiling.whole_step(shape, records)
    assert (mode, compiled) == ("documents", True)
    assert "compiled documents 0.700 ms/token + 100 s compiling" in why and "eager mask 1.200 ms/token" in why
    # a short run: 10k tokens save 3 s, compiling costs 150 s (1.5 x 100 s)
    short = dataclasses.replace(shape, remaining_tokens=10_000)
    assert compiling.whole_step(short, records)[:2] == ("documents", False)
    # train.compile: true weighs compiled options only; one measured option decides nothing
    forced = dataclasses.replace(short, setting=True)
    assert compiling.whole_step(forced, records)[:2] == ("documents", True)
    assert compiling.whole_step(shape, {"documents": {"eager_s_per_token": 1e-3}}) is None


def test_the_decoder_layers_compile_in_place_as_one_graph_and_evaluate_eagerly():
    """Regional compilation: every decoder layer compiled in place (no wrapper: the state dict keeps its keys),
    one graph for all of them (no recompile from one layer to the next), the loss and gradients those of
    the eager model; generation with a KV cache under `eager()` compiles nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, reference = build_model(400, layers=4), build_model(400, layers=4)
    keys = list(model.state_dict())
    compiled, what = compiling.compile_model(model, "aot_eager", dynamic=False)
    assert compiled is model and list(model.state_dict()) == keys
    assert what.startswith("4 x LlamaDecoderLayer") and all(
        layer._compiled_call_impl is not None for layer in model.model.layers
    )
    x = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    frames = counters["frames"]["total"]
    with compiling.eager(), torch.no_grad():
        model.generate(x[:1, :5], max_new_tokens=3, do_sample=False)
    assert counters["frames"]["total"] == frames


def test_a_whole_model_compiled_checkpoint_loads_into_the_regionally_compiled_model():
    saved = torch.compile(build_model(400, seed=1), backend="aot_eager").state_dict()
    assert all(k.startswith("_orig_mod.") for k in saved)
    model, _ = compiling.compile_model(build_model(400, seed=2), "aot_eager", dynamic=False)
    model.load_state_dict(saved)
    assert all(torch.equal(v, saved["_orig_mod." + k]) for k, v in model.state_dict().items())


def test_a_model_without_repeated_blocks_compiles_whole():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    compiled, what = compiling.compile_model(model, "aot_eager", dynamic=False)
    assert compiled is not model and "whole model" in what
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), model(x))
