"""docs/migrating.md and `sftlab convert-config`: every sftlab key the guide names exists, every foreign name
it maps gets a did-you-mean to exactly that key, and public example configs of TRL, axolotl and
LLaMA-Factory convert into configs that sftlab loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sftlab.cli import main
from sftlab.config import ConfigError, SFTConfig, load_config
from sftlab.config.keys import config_keys, suggest_key
from sftlab.migrate import TOOLS, convert_config
from sftlab.migrate.readers import argparse_flags

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "migrating.md"
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
SECTIONS = tuple(SFTConfig.model_fields)
KEY = re.compile(r"`((?:%s)(?:\.[A-Za-z0-9_]+)*)`" % "|".join(SECTIONS))
COMING: tuple[str, ...] = ()  # keys named in the guide before they exist (none now)
# Fast-LLM's nested leaves that are too generic to mean one sftlab key on their own (`base`, `interval`, ...)
GENERIC = {
    "base",
    "interval",
    "keep",
    "minimum",
    "iterations",
    "field",
    "validation",
    "training",
    "format",
    "enabled",
}


def rows() -> list[tuple[str, str, str]]:
    """(section title, foreign cell, sftlab cell) of every table row of the guide's per-tool tables."""
    out, title = [], ""
    for line in GUIDE.read_text().splitlines():
        if line.startswith("#"):
            title = line.strip("# ")
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")] if line.startswith("| `") else []
        if len(cells) >= 2 and not title.startswith("Semantic"):
            out.append((title, cells[0], cells[1]))
    return out


def exists(key: str) -> bool:
    keys = config_keys()
    return key in keys or any(k.startswith(key + ".") for k in keys)


def test_guide_has_a_table_per_tool():
    titles = {t for t, _, _ in rows()}
    for tool in (
        "TRL",
        "open-instruct",
        "Fast-LLM",
        "axolotl",
        "LLaMA-Factory (arguments)",
        "dataset_info.json",
    ):
        assert any(tool in t for t in titles), tool
    assert len(rows()) > 250
    assert "docs/migrating.md" in (ROOT / "README.md").read_text()


def test_every_sftlab_key_in_the_guide_exists():
    prose = GUIDE.read_text().split("## Semantic differences")[1]
    named = {k for _, _, ours in rows() for k in KEY.findall(ours)} | set(KEY.findall(prose))
    missing = sorted(k for k in named if not exists(k) and not k.startswith(COMING))
    assert not missing, f"docs/migrating.md names keys sftlab does not have: {missing}"
    assert len(named) > 70


def test_every_row_maps_or_says_why_not():
    bad = [
        (t, f, o)
        for t, f, o in rows()
        if not (o.startswith("`") or o.startswith(("not needed:", "not supported")))
    ]
    assert not bad, bad


def mapped_names() -> list[tuple[str, str]]:
    """(foreign leaf name, the sftlab key it maps to) for every mapped row, one per foreign name."""
    out = []
    for _, foreign, ours in rows():
        target = KEY.findall(ours)
        if not ours.startswith("`") or not target or target[0].startswith(COMING):
            continue
        for name in re.findall(r"`([^`]+)`", foreign):
            if ":" in name or "{" in name:  # a value inside a mapping (dataset_info columns), not a key
                continue
            leaf = name.replace("[]", "").rsplit(".", 1)[-1]
            if leaf not in GENERIC:
                out.append((leaf, target[0]))
    return out


def placements(leaf: str, target: str) -> list[tuple[tuple, str]]:
    """Where a user puts the foreign name: at the top level (flat TRL/axolotl/LLaMA-Factory files) and in
    the section of its sftlab key (a source for source keys), with the suggestion expected there."""
    out = [] if leaf in SECTIONS else [((leaf,), target)]
    if ".N." in target:
        section, rest = target.split(".N.")
        out.append(((*section.split("."), 0, leaf), f"{section}.0.{rest}"))
    else:
        parent = tuple(target.split(".")[:-1]) or (target,)
        out.append(((*parent, leaf), target))
    return out


def test_every_mapped_foreign_name_suggests_its_key():
    own_leaves = {k.rsplit(".", 1)[-1] for k in config_keys()}
    wrong, checked = [], 0
    for leaf, target in mapped_names():
        if leaf in own_leaves:  # the foreign name is our own key: valid where it belongs, found anywhere else
            continue
        for loc, want in placements(leaf, target):
            checked += 1
            if suggest_key(loc) != want:
                wrong.append(f"{'.'.join(map(str, loc))}: suggests {suggest_key(loc)}, the guide says {want}")
    assert not wrong, "\n".join(wrong)
    assert checked > 150


@pytest.mark.parametrize(
    "override, hint",
    [
        ("learning_rate=1e-4", "learning_rate: unknown key; did you mean optim.lr?"),
        ("train.lr_scheduler=cosine", "did you mean optim.scheduler?"),
        ("data.train.0.formatting=sharegpt", "did you mean data.train.0.format?"),
        ("sequence_len=4096", "did you mean data.max_seq_length?"),
        ("lora_target=all", "did you mean peft.target_modules?"),
    ],
)
def test_config_show_suggests_the_key(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x.jsonl", override])
    assert hint in str(e.value)


FILES = sorted(
    (p.parent.name, p)
    for p in FIXTURES.glob("*/*.y*ml")
    if p.parent.name in ("trl", "axolotl", "llamafactory")
)
# the seeds' own example configs and launch scripts (tests/fixtures/configs/README.md)
SEEDS = sorted(
    [(p.parent.name, p) for tool in ("open-instruct", "fast-llm") for p in (FIXTURES / tool).iterdir()]
    + [("halos", FIXTURES / "halos" / "sft_llama3.sh")]
)


def test_fixtures_are_a_sample_of_each_tool():
    assert {tool for tool, _ in FILES} == {"trl", "axolotl", "llamafactory"}
    assert all(sum(t == tool for t, _ in FILES) == 5 for tool in ("trl", "axolotl", "llamafactory"))
    assert {tool for tool, _ in SEEDS} == {"open-instruct", "fast-llm", "halos"} and len(SEEDS) == 8


@pytest.mark.parametrize("tool, path", FILES, ids=[p.name for _, p in FILES])
def test_public_configs_convert_and_load(tool, path, tmp_path, capsys):
    assert main(["convert-config", str(path), "--from", tool]) == 0
    text = capsys.readouterr().out
    out = tmp_path / "converted.yaml"
    out.write_text(text)
    cfg = load_config(out)
    raw = yaml.safe_load(path.read_text())
    assert cfg.data.train, text
    for line in (x for x in text.splitlines() if x.startswith(("# not converted", "# not needed"))):
        key = line.split(": ", 1)[1].split("=", 1)[0]
        assert key in raw or key.startswith(("dataset ", "datasets[", "peft ", "packing_strategy")), line
    assert main(["config", "show", str(out)]) == 0


def test_trl_conversion(tmp_path):
    text = convert_config(FIXTURES / "trl" / "handbook_prometheus_qlora.yaml", "trl")
    cfg = yaml.safe_load(text)
    assert cfg["model"] == {
        "name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "dtype": "float16",
        "revision": "main",
    }
    assert cfg["data"]["train"] == [{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}]
    assert cfg["data"]["eval"] == [{"path": "HuggingFaceH4/ultrachat_200k", "split": "test_sft"}]
    assert (
        cfg["peft"]["quantize"] == "nf4"
        and cfg["peft"]["r"] == 16
        and cfg["peft"]["target_modules"][0] == "q_proj"
    )
    assert cfg["checkpoint"] == {"every_steps": 100, "keep_last": 1}
    assert cfg["train"]["mixed_precision"] == "bf16" and cfg["data"]["on_overlength"] == "truncate"
    assert "# not converted: chat_template=<inline Jinja> (save it as a .jinja file" in text
    assert cfg["train"]["push_to_hub"] is True and cfg["train"]["hub_model_id"] == "prometheus-7b-v1.5-beta"
    assert "# not converted: hub_strategy=every_save (the final model is pushed once" in text
    smol = yaml.safe_load(convert_config(FIXTURES / "trl" / "handbook_smollm_sft.yaml", "trl"))
    assert len(smol["data"]["train"]) == 10 and smol["data"]["eval_fraction"] == 0.05
    assert smol["data"]["train"][4] == {
        "path": "HuggingFaceTB/OpenHermes-2.5-H4",
        "split": "train_sft",
        "subset": "default",
        "weight": 0.001,
    }
    r1 = yaml.safe_load(convert_config(FIXTURES / "trl" / "open_r1_smollm2_1.7b_sft.yaml", "trl"))
    assert (
        r1["data"]["packing"] == "bfd" and r1["optim"]["name"] == "adamw" and "max_steps" not in r1["train"]
    )
    assert r1["data"]["train"] == [
        {"path": "open-r1/OpenR1-Math-220k", "split": "train", "subset": "default"}
    ]


def test_axolotl_conversion():
    text = convert_config(FIXTURES / "axolotl" / "llama3_instruct_lora_8b.yml", "axolotl")
    cfg = yaml.safe_load(text)
    assert cfg["data"]["train"] == [{"path": "fozziethebeat/alpaca_messages_2k_test", "format": "messages"}]
    assert cfg["data"]["chat_template"] == "llama3" and cfg["data"]["eval_fraction"] == 0.05
    assert cfg["peft"] == {
        "method": "lora",
        "r": 32,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
        "quantize": "int8",
    }
    assert cfg["optim"]["name"] == "adamw_8bit" and cfg["checkpoint"] == {"every_epoch": True}
    qlora = yaml.safe_load(convert_config(FIXTURES / "axolotl" / "llama3_qlora_1b.yml", "axolotl"))
    assert qlora["peft"]["quantize"] == "nf4" and qlora["data"]["train"][0]["format"] == "alpaca"
    assert qlora["data"]["packing"] == "bfd" and qlora["data"]["eval_packing"] is True
    fft = yaml.safe_load(convert_config(FIXTURES / "axolotl" / "llama3_fft_8b.yaml", "axolotl"))
    assert "peft" not in fft and fft["optim"]["lr"] == 2e-5 and fft["optim"]["name"] == "paged_adamw_8bit"


def test_llamafactory_conversion_reads_dataset_info(tmp_path):
    text = convert_config(FIXTURES / "llamafactory" / "llama3_lora_sft_otfq.yaml", "llamafactory")
    cfg = yaml.safe_load(text)
    assert [s["path"] for s in cfg["data"]["train"]] == ["data/identity.json", "data/alpaca_en_demo.json"]
    assert cfg["data"]["train"][0]["format"] == "alpaca" and cfg["data"]["eval_fraction"] == 0.1
    assert cfg["peft"] == {"method": "lora", "target_modules": "all-linear", "quantize": "nf4"}
    assert cfg["train"]["eval_every"] == 500 and "# not converted: max_samples=1000" in text
    config = tmp_path / "sft.yaml"
    config.write_text(
        "dataset: glaive_toolcall_en_demo,ultrachat_200k,openorca,llava_1k_en\ndataset_dir: "
        f"{FIXTURES / 'llamafactory' / 'data'}\nfinetuning_type: full\n"
    )
    text = convert_config(config, "llamafactory")
    glaive, ultra, orca, llava = yaml.safe_load(text)["data"]["train"]
    assert (
        glaive["format"] == "sharegpt"
        and "columns" not in glaive
        and glaive["path"].endswith("glaive_toolcall_en_demo.json")
    )
    assert ultra == {
        "path": "HuggingFaceH4/ultrachat_200k",
        "name": "ultrachat_200k",
        "format": "sharegpt",
        "split": "train_sft",
        "columns": {"conversations": "messages", "from": "role", "value": "content"},
    }
    assert orca["columns"] == {"instruction": "question", "output": "response", "system": "system_prompt"}
    assert "# not converted: dataset llava_1k_en columns.images=images" in text
    assert load_config(_saved(tmp_path, text)).data.train[1].columns["from"] == "role"


def _saved(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "converted.yaml"
    path.write_text(text)
    return path


def test_bad_input_is_one_error(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        convert_config(tmp_path / "list.yaml", "trl")
    with pytest.raises(ConfigError, match="cannot read"):
        convert_config(tmp_path / "missing.yaml", "axolotl")
    assert main(["convert-config", str(tmp_path / "missing.yaml"), "--from", "trl"]) == 2


@pytest.mark.parametrize("tool, path", SEEDS, ids=[p.name for _, p in SEEDS])
def test_seed_configs_convert_with_every_key_accounted_for(tool, path, tmp_path, capsys):
    """Each seed's own config: converted, loadable, and no key left as "no counterpart" (each one either
    converts, or says why it is not needed or what to do instead)."""
    assert main(["convert-config", str(path), "--from", tool]) == 0
    text = capsys.readouterr().out
    assert "no sftlab counterpart" not in text, text
    raw = TOOLS[tool].read(path, [])
    for line in (x for x in text.splitlines() if x.startswith(("# not converted", "# not needed"))):
        key = line.split(": ", 1)[1].split("=", 1)[0]
        assert key in raw or key.startswith(("datasets ", "peft ", "human_prefix", "data.datasets.")), line
    cfg = load_config(_saved(tmp_path, text))
    assert cfg.data.train and cfg.model.name_or_path or cfg.model.tokenizer


def test_open_instruct_script_and_yaml():
    """The Tulu 3 8B SFT command (docs/tulu3.md): shell variables substituted, accelerate's flags read."""
    text = convert_config(FIXTURES / "open-instruct" / "tulu3_8b_sft.sh", "open-instruct")
    cfg = yaml.safe_load(text)
    assert cfg["data"]["train"] == [{"path": "allenai/tulu-3-sft-mixture", "split": "train"}]
    assert cfg["optim"]["lr"] == 5e-6 and cfg["optim"]["max_grad_norm"] is None
    # 64 processes x 1 x 2: the global batch, whatever the processes of a launch; no accumulation of its own
    assert cfg["train"]["micro_batch_size"] == 1 and cfg["train"]["global_batch_size"] == 128
    assert "grad_accum_steps" not in cfg["train"]
    assert cfg["train"]["seed"] == 123 and cfg["train"]["mixed_precision"] == "bf16"
    assert cfg["checkpoint"] == {"every_epoch": True, "keep_last": 3}
    assert (
        cfg["model"]["attn_implementation"] == "flash_attention_2"
        and cfg["data"]["on_overlength"] == "truncate"
    )
    assert "configs/accelerate/deepspeed_zero3.yaml" in text and "= 128 examples per optimizer step" in text
    assert (
        "reduce_loss=sum" in text and "loss_normalization" not in cfg["train"]
    )  # sum: the token mean, noted
    mix = yaml.safe_load(convert_config(FIXTURES / "open-instruct" / "default.yaml", "open-instruct"))
    assert mix["train"]["loss_normalization"] == "micro_batch_mean"  # reduce_loss's default, mean
    assert [(s["path"], s["weight"]) for s in mix["data"]["train"]] == [
        ("allenai/tulu-v2-sft-mixture", 0.5),
        ("HuggingFaceH4/no_robots", 0.8),
    ]
    one = convert_config(
        FIXTURES / "open-instruct" / "olmo2_1124_7b_sft.yaml", "open-instruct", ["max_train_samples=500"]
    )
    assert yaml.safe_load(one)["data"]["train"][0]["weight"] == 500


def test_open_instruct_flags_are_read_as_argparse_reads_them(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text(
        "LR=3e-5\npython open_instruct/finetune.py --model_name_or_path m --learning_rate $LR "
        "--dataset_mixer_list a.jsonl 100 b.jsonl 1.0 --use_lora --lora_rank=8 --no_push_to_hub "
        "--clip_grad_norm 1.0 --keep_last_n_checkpoints -1 2>&1 | tee log.txt\n"
    )
    cfg = yaml.safe_load(convert_config(script, "open-instruct"))
    assert cfg["optim"]["lr"] == 3e-5 and cfg["optim"]["max_grad_norm"] == 1.0
    assert cfg["data"]["train"] == [
        {"path": "a.jsonl", "weight": 100, "split": "train"},
        {"path": "b.jsonl", "split": "train"},
    ]
    assert cfg["peft"] == {"method": "lora", "r": 8} and cfg["train"]["push_to_hub"] is False
    assert cfg["checkpoint"]["keep_last"] is None
    assert argparse_flags(["--a", "1", "--b", "x", "y", "--flag", "--no_c", "--d=2"]) == {
        "a": 1,
        "b": ["x", "y"],
        "flag": True,
        "c": False,
        "d": 2,
    }


def test_fast_llm_training_and_prepare_configs():
    guide = yaml.safe_load(convert_config(FIXTURES / "fast-llm" / "sft_guide.yaml", "fast-llm"))
    assert guide["train"]["max_steps"] == 100_000 and guide["train"]["micro_batch_size"] == 2
    assert guide["optim"]["min_lr_ratio"] == 0.1 and guide["optim"]["betas"] == [0.9, 0.95]
    assert guide["data"]["packing"] == "bfd" and guide["data"]["max_seq_length"] == 4096
    assert guide["train"]["eval_every"] == 1000 and guide["train"]["eval_max_batches"] == 25
    new = yaml.safe_load(convert_config(FIXTURES / "fast-llm" / "instruction_finetuning.yaml", "fast-llm"))
    assert new["train"]["micro_batch_tokens"] == 4096 and new["train"]["eval_every"] == 100
    assert new["model"]["attn_implementation"] == "flash_attention_2"
    prep = yaml.safe_load(convert_config(FIXTURES / "fast-llm" / "prepare.yaml", "fast-llm"))
    assert prep["data"]["train"] == [
        {
            "path": "./sft-tutorial/hf_dataset",
            "format": "text",
            "split": "train",
            "columns": {"loss_masking_spans": "spans"},
        }
    ]
    assert prep["data"]["eval_fraction"] == 0.002


def test_halos_hydra_config_with_overrides(tmp_path):
    config = FIXTURES / "halos" / "config" / "config.yaml"
    text = convert_config(
        config,
        "halos",
        [
            "loss=sft",
            "model=llama",
            "datasets=[ultrachat]",
            "exp_name=run1",
            "++model.name_or_path=/models/base",
            "++lr=1e-5",
            "++model.batch_size=64",
            "++model.gradient_accumulation_steps=4",
            "++model.use_peft=true",
        ],
    )
    cfg = yaml.safe_load(text)
    assert cfg["model"] == {"name_or_path": "/models/base", "attn_implementation": "flash_attention_2"}
    assert cfg["train"]["output_dir"] == ".cache//run1" and cfg["optim"]["lr"] == 1e-5
    assert cfg["train"]["micro_batch_size"] == 16 and cfg["train"]["global_batch_size"] == 64
    assert cfg["train"]["loss_normalization"] == "micro_batch_mean"  # HALOs' mean of micro-batch means
    assert cfg["train"]["eval_every"] == 16  # eval_every: 1024 examples in steps of 64
    assert cfg["optim"]["scheduler"] == "constant" and cfg["optim"]["max_grad_norm"] == 5.0
    assert cfg["peft"] == {
        "method": "lora",
        "r": 64,
        "alpha": 256.0,
        "dropout": 0.05,
        "target_modules": "all-linear",
    }
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "dpo.yaml").write_text(
        "trainer: DPOTrainer\ndataloader: PairedPreferenceDataLoader\n"
    )
    (tmp_path / "model").mkdir()
    for f in (FIXTURES / "halos" / "config" / "model").iterdir():
        (tmp_path / "model" / f.name).write_text(f.read_text())
    (tmp_path / "config.yaml").write_text(config.read_text())
    with pytest.raises(ConfigError, match="sftlab trains SFT only"):
        convert_config(
            tmp_path / "config.yaml", "halos", ["loss=dpo", "model=llama", "datasets=[x]", "exp_name=y"]
        )
    with pytest.raises(ConfigError, match="HALOs needs loss=NAME"):
        convert_config(config, "halos", ["model=llama", "datasets=[x]", "exp_name=y"])


def test_trl_metric_for_best_model_is_kept(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("metric_for_best_model: eval_gsm_loss\nload_best_model_at_end: true\n")
    cfg = yaml.safe_load(convert_config(path, "trl"))
    assert (
        cfg["train"]["metric_for_best"] == "eval/gsm_loss" and cfg["train"]["load_best_model_at_end"] is True
    )
    path.write_text("metric_for_best_model: accuracy\n")
    assert "# not converted: metric_for_best_model=accuracy" in convert_config(path, "trl")


def test_a_hydra_override_into_a_null_section_is_kept():
    """`++model.peft.lora_r=8` where the file says `peft: null` makes the section (not a lost override)."""
    from sftlab.migrate.readers import hydra_override

    tree = {"model": {"peft": None, "name": "x"}}
    hydra_override(tree, "++model.peft.lora_r=8")
    hydra_override(tree, "+lr=5e-06")
    assert tree == {"model": {"peft": {"lora_r": 8}, "name": "x"}, "lr": 5e-06}
