"""Config: YAML maps 1:1 onto typed sections; overrides; bad keys and types named by dotted path."""

from __future__ import annotations

import pytest
import yaml

from sftlab.config import ConfigError, SFTConfig, load_config
from sftlab.config.loading import dump_config


def write(tmp_path, tree) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


BASE = {"data": {"train": [{"path": "x.jsonl"}]}}


def test_defaults_follow_common_practice(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert (
        cfg.optim.lr,
        cfg.optim.warmup_ratio,
        cfg.optim.scheduler,
        cfg.optim.weight_decay,
        cfg.train.seed,
    ) == (2e-5, 0.03, "linear", 0.0, 42)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "optim.lr=1e-5",
            "train.max_steps=7",
            "optim.max_grad_norm=null",
            "data.train.0.path=y.jsonl",
            "model.dtype=bfloat16",
        ],
    )
    assert cfg.optim.lr == 1e-5 and cfg.train.max_steps == 7 and cfg.optim.max_grad_norm is None
    assert cfg.data.train[0].path == "y.jsonl" and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("value", ["-1", "0", "-0.5", "null"])
def test_max_grad_norm_at_or_below_zero_is_no_clipping(tmp_path, value):
    # open-instruct's clip_grad_norm -1 means off; torch's clip with a negative norm would reverse the gradients
    cfg = load_config(write(tmp_path, BASE), [f"optim.max_grad_norm={value}"])
    assert cfg.optim.max_grad_norm is None
    cfg = load_config(
        write(tmp_path, {**BASE, "optim": {"max_grad_norm": float(value) if value != "null" else None}})
    )
    assert cfg.optim.max_grad_norm is None
    cfg.optim.max_grad_norm = -1.0
    assert cfg.optim.max_grad_norm is None
    assert load_config(write(tmp_path, BASE), ["optim.max_grad_norm=0.5"]).optim.max_grad_norm == 0.5


@pytest.mark.parametrize(
    "tree_or_override, path",
    [
        ({"optim": {"lrr": 1.0}}, "optim.lrr"),
        ({"train": {"micro_batch_size": "eight"}}, "train.micro_batch_size"),
        ({"data": {"train": [{"path": "x", "fromat": "messages"}]}}, "data.train.0.fromat"),
        ({"trian": {}}, "trian"),
        ("optim.scheduler=cosin", "optim.scheduler"),
        ("train.max_steps=-1", "train.max_steps"),
    ],
)
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
    with pytest.raises(ConfigError, match=r"override 'peft.target_modules=\[': the value is not valid YAML"):
        load_config(write(tmp_path, BASE), ["peft.target_modules=["])


def test_training_data_required(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(write(tmp_path, {"optim": {"lr": 1e-4}}))


def test_config_error_is_an_sftlab_error_and_a_value_error(tmp_path):
    from sftlab.errors import SftlabError

    with pytest.raises(SftlabError) as e:
        load_config(write(tmp_path, BASE), ["optim.lrr=1"])
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


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


# --- config help: suggestions, descriptions, the committed reference --------------------------


@pytest.mark.parametrize(
    "override, hint",
    [
        ("optim.learning_rate=1e-5", "optim.learning_rate: unknown key; did you mean optim.lr?"),
        ("train.learning_rate=1e-5", "did you mean optim.lr?"),
        ("train.gradient_accumulation_steps=2", "did you mean train.grad_accum_steps?"),
        ("train.mixed_precison=bf16", "did you mean train.mixed_precision?"),
        ("data.train.0.fromat=messages", "did you mean data.train.0.format?"),
        ("peft.lora_r=8", "did you mean peft.r?"),
        ("optim.scheduler=cosin", "did you mean 'cosine'?"),
        ("data.packing=bdf", "did you mean 'bfd'?"),
        (
            "train.response_template=x",
            "train.response_template: unknown key; did you mean data.response_template?",
        ),
        ("data.train.0.dataset_text_field=body", "did you mean data.train.0.columns?"),
        ("model.tokenizer_name=x", "did you mean model.tokenizer?"),
        ("model.model_init_kwargs={}", "did you mean model.init_kwargs?"),
        ("optim.final_lr_ratio=0.1", "did you mean optim.min_lr_ratio?"),
        ("checkpoint.clean_checkpoints_at_end=true", "did you mean checkpoint.delete_at_end?"),
        ("data.cutoff_len=512", "did you mean data.max_seq_length?"),
        ("data.template=chatml", "did you mean data.chat_template?"),
        ("model.use_flash_attn=true", "did you mean model.attn_implementation?"),
        ("peft.lora_bias=all", "did you mean peft.bias?"),
        ("train.eval_iters=5", "did you mean train.eval_max_batches?"),
        ("data.completion_only_loss=true", "did you mean data.loss_on?"),
        ("instruction_template=x", "did you mean data.instruction_template?"),
    ],
)
def test_unknown_keys_and_values_get_a_suggestion(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert hint in str(e.value)


@pytest.mark.parametrize(
    "overrides, want",
    [
        (["data.response_template=### Answer:"], ("### Answer:", None)),  # YAML would read a comment
        (["data.response_template=A:", "data.instruction_template=Q: {"], ("A:", "Q: {")),  # ... or a mapping
        (["data.response_template=' ### Answer:'"], (" ### Answer:", None)),  # YAML quotes are read
        (["data.response_template= ### Answer:"], (" ### Answer:", None)),  # a leading space is kept
        (["data.response_template=### Answer:", "data.response_template=null"], (None, None)),
    ],
)
def test_marker_overrides_are_taken_as_written(overrides, want):
    data = load_config(None, ["data.train=x.jsonl", *overrides]).data
    assert (data.response_template, data.instruction_template) == want


@pytest.mark.parametrize(
    "overrides, error",
    [
        (
            ["data.instruction_template=Q:"],
            "data.instruction_template: Value error, instruction_template needs a response_template",
        ),
        (
            ["data.response_template=Q:", "data.instruction_template=Q:"],
            "are the same ('Q:'); they must differ",
        ),
        (
            ["data.train.0.instruction_template=Q:"],
            "data.train.0.instruction_template: Value error, instruction_template needs a response_template",
        ),
        (["data.response_template=''"], "data.response_template: String should have at least 1 character"),
    ],
)
def test_marker_settings_are_checked(overrides, error):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x.jsonl", *overrides])
    assert error in str(e.value)


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzzqqq=1"])
    assert "train.zzzqqq: unknown key" in str(e.value) and "did you mean" not in str(e.value)


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from sftlab.config import SFTConfig
    from sftlab.config.keys import model_of

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            inner = model_of(field.annotation)
            if inner is not None:
                yield from walk(inner, f"{prefix}{name}.")
            yield f"{prefix}{name}"

    assert len(list(walk(SFTConfig, ""))) > 60


def test_committed_reference_is_current():
    from pathlib import Path

    from sftlab.config.reference import config_reference

    committed = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert committed.read_text(encoding="utf-8") == config_reference() + "\n", (
        "docs/config.md is stale: regenerate it with `sftlab config reference > docs/config.md`"
    )


def _readme_yaml_blocks() -> list[dict]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]


def _assert_defaults(values: dict, model, where: str) -> list[str]:
    """Every value in `values` equals the typed default of `model` (required keys such as paths excepted)."""
    from pydantic import TypeAdapter

    from sftlab.config.keys import model_of
    from sftlab.config.schema import SourceConfig

    checked = []
    for key, value in values.items():
        assert key in model.model_fields, f"README: {where}{key} is not a config key"
        field = model.model_fields[key]
        inner = model_of(field.annotation)
        if field.is_required():
            continue
        if inner is SourceConfig:
            for i, src in enumerate(value):
                checked += _assert_defaults(src, SourceConfig, f"{where}{key}.{i}.")
        elif inner is not None and isinstance(value, dict):
            checked += _assert_defaults(value, inner, f"{where}{key}.")
        else:
            default = field.get_default(call_default_factory=True)
            assert TypeAdapter(field.annotation).validate_python(value) == default, (
                f"README shows {where}{key}: {value!r}, the default is {default!r}"
            )
            checked.append(f"{where}{key}")
    return checked


def test_readme_example_configs_are_the_defaults():
    """The README's config example and its LoRA block show the real defaults (data paths excepted)."""
    from sftlab.config.keys import model_of

    blocks = [
        b
        for b in _readme_yaml_blocks()
        if isinstance(b, dict) and ({"model", "optim"} <= b.keys() or "peft" in b)
    ]
    assert len(blocks) == 2, "the README's main config example and its peft block"
    checked = []
    for block in blocks:
        SFTConfig.model_validate({"data": {"train": "x.jsonl"}, **block})  # each block is a valid config
        for section, values in block.items():
            checked += _assert_defaults(
                values, model_of(SFTConfig.model_fields[section].annotation), f"{section}."
            )
    assert {
        "data.eval_fraction",
        "optim.warmup_ratio",
        "train.overwrite",
        "peft.r",
        "data.train.0.format",
    } <= set(checked)
    assert len(checked) > 50
