"""Sharded engines through the recipes in configs/accelerate/, launched with `accelerate launch` as a
user would: 2 CPU processes over gloo, a tiny Llama, fp32 math.

- Every engine (DDP, FSDP2, DeepSpeed ZeRO-2, ZeRO-3) trains exactly like one process with the same
  global batch: per-step loss and gradient norm within 1e-5 relative, the same target counts, and a
  final model -- gathered from the shards into one plain safetensors directory -- that transformers
  loads and that equals the one-process weights (and holds the tied head once, like transformers).
- SIGKILL after step 2 + `train.resume=auto` reproduces the uninterrupted sharded run bit for bit,
  from sharded checkpoints (torch distributed checkpoint files per rank / ZeRO partitions).
- DDP + LoRA dropout: the same after SIGKILL + resume, each rank getting its own RNG states back.
- FSDP2 resumes on another world size (2 -> 3 processes) like the uninterrupted run; an FSDP checkpoint
  is refused by a one-process run (no FSDP there), with the reason.
- LoRA under FSDP saves the same adapter as one process.
- FSDP trains a tiny LLaVA, vision tower frozen, like one process (a second run in the text runs' launches,
  tests/trainer/launch_runs.py): the frozen tower comes back unchanged, model and processor load.

DeepSpeed cases are skipped (with the reason) where `deepspeed` is not installed; `make setup` installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tokenizer, chat_rows, save_tiny_model, write_jsonl
from safetensors.torch import load_file
from vlm_families import save_family, write_image_rows

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "accelerate"
ENGINES = {
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
}
ENGINE_NAMES = {"ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed"}
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LAUNCH_RUNS = str(Path(__file__).with_name("launch_runs.py"))
VLM_RIDES_ALONG = ("one", "fsdp")  # these runs' launches then train a tiny LLaVA as run vlm-NAME


def needs(engine: str):
    return pytest.mark.skipif(
        engine.startswith("zero") and not HAVE_DEEPSPEED,
        reason="deepspeed is not installed (make setup installs it)",
    )


ENGINE_PARAMS = [pytest.param(e, marks=needs(e)) for e in ENGINES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A tiny model, a data file and runs launched on demand (each run once per module)."""

    def __init__(self, root: Path):
        self.root = root
        self.model_dir = save_tiny_model(root / "tiny-model", build_tokenizer())
        rows = chat_rows()
        self.data = write_jsonl(root / "chat.jsonl", rows)
        # 5 eval examples over 2 ranks x 2 per batch: rank 1 runs an empty batch in the second round
        self.eval_data = write_jsonl(root / "eval.jsonl", rows[:5])
        self.vlm_model = save_family("llava", root / "llava")
        self.vlm_data = write_image_rows(root)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.env.pop("ACCELERATE_USE_CPU", None)  # the recipes must work without it
        self.runs: dict[str, Path] = {}

    def config(self, name: str, micro: int, peft: dict | None = None, vlm: bool = False) -> Path:
        data = (
            {"train": [{"path": str(self.vlm_data)}]}
            if vlm
            else {"train": [{"path": str(self.data)}], "eval": [{"path": str(self.eval_data)}]}
        )
        tree = {
            "model": {"name_or_path": str(self.vlm_model if vlm else self.model_dir)},
            "data": {**data, "max_seq_length": 256},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "train": {
                "output_dir": str(self.root / name),
                "micro_batch_size": micro,
                "grad_accum_steps": 2,
                "max_steps": 3,
                "mixed_precision": "no",
            },
            "checkpoint": {"every_steps": 1, "keep_last": None},
            "peft": peft,
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    def launch(
        self,
        engine: str | None,
        config: Path,
        *overrides: str,
        env: dict | None = None,
        check: bool = True,
        then: Path | None = None,
        procs: int = 2,
    ) -> subprocess.CompletedProcess:
        """Train `config` (then the config `then` in the same processes: launch_runs.py, no overrides)."""
        program = ["-m", "sftlab.cli", "train", str(config), *overrides]
        if then is not None:
            assert not overrides
            program = [LAUNCH_RUNS, "0", str(config), str(free_port()), str(then)]
        if engine is None:
            cmd = [sys.executable, *program]
        else:
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(RECIPES / ENGINES[engine]),
                "--num_processes",
                str(procs),
                "--main_process_port",
                str(free_port()),
                *program,
            ]
        r = subprocess.run(
            cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=600, check=False
        )
        (self.root / f"{config.stem}.log").write_text(r.stdout + r.stderr)  # kept for a failure's post-mortem
        if check:
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        return r

    def run(self, name: str, engine: str | None, peft: dict | None = None) -> Path:
        """Output dir of the uninterrupted run `name` (launched the first time it is asked for)."""
        if name not in self.runs:
            micro = 4 if engine is None else 2
            vlm = self.config(f"vlm-{name}", micro, vlm=True) if name in VLM_RIDES_ALONG else None
            self.launch(engine, self.config(name, micro, peft), then=vlm)
            self.runs[name] = self.root / name
        return self.runs[name]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    return Lab(tmp_path_factory.mktemp("sharded"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


TIMING = ("tokens_per_s", "target_tokens_per_s", "mfu", "model_gflops_per_s", "step_time_s")


def stable(records: list[dict]) -> list[dict]:
    """Metrics records without their wall-clock measurements."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_weights(a: dict, b: dict, rel: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:  # (an all-zero tensor, such as a frozen vision tower's bias, must stay equal)
        x, y = a[k].float(), b[k].float()
        diff = ((x - y).norm() / x.norm()).item() if x.any() else float(y.any())
        assert diff <= rel, f"{k}: relative difference {diff:.2e}"


def assert_same_steps(m1: list[dict], m2: list[dict]) -> None:
    """The 3 steps of two runs: same target tokens, loss and gradient norm within 1e-5."""
    assert len(m1) == len(m2) == 3
    assert [r["target_tokens"] for r in m1] == [r["target_tokens"] for r in m2]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_engine_matches_one_process(engine, lab):
    one, two = lab.run("one", None), lab.run(engine, engine)
    m1, m2 = metrics(one), metrics(two)
    assert_same_steps(m1, m2)
    # validation runs the same number of (collective) forwards on every rank and counts every example once
    assert m2[-1]["eval_loss"] == pytest.approx(m1[-1]["eval_loss"], rel=1e-5)
    info = json.loads((two / "run.json").read_text())
    assert (info["engine"], info["num_processes"]) == (ENGINE_NAMES[engine], 2)
    # the final model: one plain safetensors file, gathered on the main process
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert "lm_head.weight" not in w2  # tied to the embeddings: saved once, as transformers does
    # Adam turns reduction-order noise in near-zero gradient entries into lr-sized steps: whole-tensor norms
    assert_same_weights(w1, w2, rel=1e-4)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(two).state_dict()
    assert torch.equal(loaded["model.embed_tokens.weight"], w2["model.embed_tokens.weight"])
    assert torch.equal(loaded["lm_head.weight"], w2["model.embed_tokens.weight"])


SHARD_FILES = {
    "fsdp": [
        "optimizer_0/__0_0.distcp",
        "optimizer_0/__1_0.distcp",
        "pytorch_model_fsdp_0/__0_0.distcp",
        "pytorch_model_fsdp_0/__1_0.distcp",
    ],
    "zero3": [
        "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ],
}


@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs(e)) for e in SHARD_FILES])
def test_sigkill_and_resume_reproduce_the_sharded_run(engine, lab):
    full = lab.run(engine, engine)
    killed = f"{engine}-killed"
    config = lab.config(killed, 2)
    r = lab.launch(engine, config, env={"SFTLAB_TEST_KILL_AFTER_STEP": "2"}, check=False)
    assert r.returncode != 0
    ckpt = lab.root / killed / "checkpoints" / "step-00000002"
    for rel in SHARD_FILES[engine]:  # one shard per rank, no gathered copy
        assert (ckpt / rel).is_file(), rel
    assert not (lab.root / killed / "model.safetensors").exists()
    r = lab.launch(engine, config, "train.resume=auto")
    assert "resumed from" in r.stdout and "step-00000002" in r.stdout
    assert stable(metrics(lab.root / killed)) == stable(metrics(full))
    a, b = load_file(full / "model.safetensors"), load_file(lab.root / killed / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_ddp_lora_dropout_resume_restores_each_ranks_rng(lab):
    """Dropout draws per padded token, and the ranks' micro-batches are padded to different widths, so
    their torch RNG states drift apart: a resume must give every rank back its own state, not rank 0's."""
    peft, exact = {"r": 4, "alpha": 8, "dropout": 0.1}, ("step", "loss", "grad_norm", "target_tokens")
    args = ("train.deterministic=true", "train.max_steps=5")
    full, killed = lab.config("dropout", 2, peft), lab.config("dropout-killed", 2, peft)
    lab.launch("ddp", full, *args)
    r = lab.launch("ddp", killed, *args, env={"SFTLAB_TEST_KILL_AFTER_STEP": "4"}, check=False)
    assert r.returncode != 0 and not (lab.root / "dropout-killed" / "adapter_model.safetensors").exists()
    r = lab.launch("ddp", killed, *args, "train.resume=auto")
    assert "resumed from" in r.stdout and "step-00000004" in r.stdout
    got, ref = metrics(lab.root / "dropout-killed"), metrics(lab.root / "dropout")
    assert [{k: m[k] for k in exact} for m in got] == [
        {k: m[k] for k in exact} for m in ref
    ]  # bitwise floats
    a = load_file(lab.root / "dropout" / "adapter_model.safetensors")
    b = load_file(lab.root / "dropout-killed" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


@pytest.mark.parametrize("engine", [pytest.param("fsdp", marks=needs("fsdp"))])
def test_fsdp_checkpoint_refuses_a_run_without_fsdp(engine, lab):
    full = lab.run(engine, engine)
    config = lab.config("one-process-resume", 2)  # the same config, one process
    r = lab.launch(None, config, f"train.resume={full / 'checkpoints' / 'step-00000002'}", check=False)
    assert r.returncode != 0
    out = " ".join((r.stdout + r.stderr).split())
    assert "written by 2 process(es), this run has 1" in out
    assert "read by an FSDP run on any number of processes >= 2, not by a run without FSDP" in out


def test_fsdp_resumes_on_another_world_size(lab):
    """FSDP2 on 2 processes killed after step 2 resumes on 3: torch distributed checkpoint reshards the
    weights and optimizer, train.global_batch_size 6 keeps each step's examples (accumulation 3 -> 2), and
    the steps equal the uninterrupted 2-process run's."""
    configs = {}
    for name in ("fsdp-g6", "fsdp-g6-killed"):
        tree = yaml.safe_load(lab.config(name, 1).read_text())
        tree["train"].update(global_batch_size=6)
        tree["train"].pop("grad_accum_steps")
        tree["checkpoint"] = {"every_steps": 2}
        configs[name] = lab.root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(tree))
    lab.launch("fsdp", configs["fsdp-g6"])
    r = lab.launch("fsdp", configs["fsdp-g6-killed"], env={"SFTLAB_TEST_KILL_AFTER_STEP": "2"}, check=False)
    assert r.returncode != 0
    r = lab.launch("fsdp", configs["fsdp-g6-killed"], "train.resume=auto", procs=3)
    out = " ".join(r.stdout.split())
    assert (
        "resume on 3 process(es) (the checkpoint: 2)" in out and "grad_accum_steps 2 x 3 process(es)" in out
    )
    assert "resumed from" in out and "step-00000002" in out
    ref, got = metrics(lab.root / "fsdp-g6"), metrics(lab.root / "fsdp-g6-killed")
    assert_same_steps(ref, got)
    assert_same_weights(
        load_file(lab.root / "fsdp-g6" / "model.safetensors"),
        load_file(lab.root / "fsdp-g6-killed" / "model.safetensors"),
        rel=1e-4,
    )


def test_lora_under_fsdp_saves_the_one_process_adapter(lab):
    peft = {"r": 4, "alpha": 8, "dropout": 0.0}
    one, two = lab.run("lora-one", None, peft), lab.run("lora-fsdp", "fsdp", peft)
    for a, b in zip(metrics(one), metrics(two)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert_same_weights(
        load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors"), rel=1e-4
    )


def test_fsdp_trains_a_vision_language_model_like_one_process(lab):
    """A tiny LLaVA (CLIP vision tower frozen: model.freeze's default) under FSDP2, after the text model in
    the same launches. transformers lists CLIP's text-model layer among LLaVA's `_no_split_modules`; sftlab
    wraps only the listed classes the model holds (Accelerate refuses a missing one)."""
    lab.run("one", None), lab.run("fsdp", "fsdp")
    one, two = lab.root / "vlm-one", lab.root / "vlm-fsdp"
    m1, m2 = metrics(one), metrics(two)
    assert_same_steps(m1, m2)
    info = json.loads((two / "run.json").read_text())
    assert (info["engine"], info["num_processes"]) == ("fsdp", 2)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert_same_weights(w1, w2, rel=1e-4)
    base = load_file(lab.vlm_model / "model.safetensors")
    tower = [k for k in base if "vision_tower" in k]
    assert tower and all(torch.equal(w2[k], base[k]) for k in tower)  # frozen: gathered back unchanged
    assert not all(torch.equal(w2[k], base[k]) for k in base if "language_model" in k)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = AutoModelForImageTextToText.from_pretrained(
        two
    ).state_dict()  # (its names: transformers 5's layout)
    assert len(loaded) == len(w2) and torch.equal(
        loaded["lm_head.weight"], w2["language_model.lm_head.weight"]
    )
    layer = "layers.0.mlp.down_proj.weight"
    assert torch.equal(loaded[f"model.language_model.{layer}"], w2[f"language_model.model.{layer}"])
    assert type(AutoProcessor.from_pretrained(two, use_fast=False)).__name__ == "LlavaProcessor"


@pytest.mark.parametrize("recipe", sorted(ENGINES.values()))
def test_recipes_are_valid_accelerate_configs(recipe):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(RECIPES / recipe)  # rejects unknown keys
    value = lambda x: getattr(x, "value", x)
    assert (
        value(cfg.compute_environment) == "LOCAL_MACHINE" and cfg.num_machines == 1 and cfg.machine_rank == 0
    )
    assert value(cfg.mixed_precision) == "no"  # precision comes from the run config
    if recipe == "fsdp.yaml":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert (
            fsdp["fsdp_reshard_after_forward"] is True
            and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        )
    if recipe.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(recipe[-6])


@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs(e)) for e in ("fsdp", "zero3")])
def test_a_sharded_checkpoint_loads_in_one_process(engine, lab):
    """generate/chat/eval from RUN/checkpoints/step-N: the shards read back into one whole model."""
    from sftlab.trainer.inference import load_model_dir

    run = lab.run(engine, engine)
    model, _ = load_model_dir(
        run / "checkpoints" / "step-00000003"
    )  # the last step: the saved model's weights
    state, final = model.state_dict(), load_file(run / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in final.items())
