"""Config: YAML maps 1:1 onto typed sections; overrides; bad keys and types named by dotted path."""

from __future__ import annotations

import pytest
import yaml

from sftlab.config import ConfigError, SFTConfig, dump_config, load_config


def write(tmp_path, tree) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


BASE = {"data": {"train": [{"path": "x.jsonl"}]}}


def test_defaults_follow_common_practice(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.scheduler, cfg.optim.weight_decay, cfg.train.seed) == \
        (2e-5, 0.03, "linear", 0.0, 42)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=1e-5", "train.max_steps=7", "optim.max_grad_norm=null",
                                              "data.train.0.path=y.jsonl", "model.dtype=bfloat16"])
    assert cfg.optim.lr == 1e-5 and cfg.train.max_steps == 7 and cfg.optim.max_grad_norm is None
    assert cfg.data.train[0].path == "y.jsonl" and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("tree_or_override, path", [
    ({"optim": {"lrr": 1.0}}, "optim.lrr"),
    ({"train": {"micro_batch_size": "eight"}}, "train.micro_batch_size"),
    ({"data": {"train": [{"path": "x", "fromat": "messages"}]}}, "data.train.0.fromat"),
    ({"trian": {}}, "trian"),
    ("optim.scheduler=cosin", "optim.scheduler"),
    ("train.max_steps=-1", "train.max_steps"),
])
def test_bad_key_or_type_is_named(tmp_path, tree_or_override, path):
    if isinstance(tree_or_override, dict):
        tree = {**BASE, **tree_or_override}
        if "data" in tree_or_override:
            tree["data"] = tree_or_override["data"]
        args = (write(tmp_path, tree), [])
    else:
        args = (write(tmp_path, BASE), [tree_or_override])
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    assert f"  {path}:" in str(e.value)


def test_override_into_unknown_section_rejected(tmp_path):
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(write(tmp_path, BASE), ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["optim.lr"])


def test_training_data_required(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(write(tmp_path, {"optim": {"lr": 1e-4}}))


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.betas=[0.9, 0.95]"])
    again = SFTConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and again.optim.betas == (0.9, 0.95)


def test_demo_config_is_valid_and_paths_resolve():
    from pathlib import Path
    cfg = load_config()
    assert Path(cfg.data.train[0].path).is_file() and Path(cfg.match_eval.path).is_file()


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
