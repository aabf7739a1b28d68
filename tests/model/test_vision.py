"""Vision-language models (model/vision.py): AutoProcessor / AutoModelForImageTextToText from a saved tiny
model, text-only models without a processor, and model.freeze."""

from __future__ import annotations

import pytest
from transformers import (
    AutoModelForCausalLM,
    Idefics3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from vlm_families import FAMILIES, build_family, save_family

from sftlab.config import SFTConfig
from sftlab.config.schema import ModelConfig
from sftlab.model.loading import ModelLoadError, load_model
from sftlab.model.vision import freeze, is_vision_model, load_processor, part_of
from sftlab.trainer.run_model import RunTokens, build_run_model


@pytest.mark.parametrize(
    "family, cls",
    [
        ("idefics3", Idefics3ForConditionalGeneration),
        ("llava", LlavaForConditionalGeneration),
        ("qwen2_vl", Qwen2VLForConditionalGeneration),
    ],
)
def test_a_saved_vision_model_loads_with_its_processor(tmp_path, family, cls):
    d = str(save_family(family, tmp_path / family))
    cfg = ModelConfig(name_or_path=d)
    proc = load_processor(cfg, d)
    assert type(proc.image_processor).__name__.endswith("Pil")  # no torchvision needed
    if family == "qwen2_vl":  # its video processor needs torchvision: built without it, saved back as it was
        assert type(proc).__name__ == "Qwen2VLProcessor" and "video_processor" not in proc.get_attributes()
        assert proc.to_dict()["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (
        proc.chat_template
        and proc.tokenizer.convert_tokens_to_ids(proc.image_token) != proc.tokenizer.unk_token_id
    )
    model = load_model(cfg, d)
    assert isinstance(model, cls) and is_vision_model(model)


def test_a_text_only_model_has_no_processor(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    assert load_processor(cfg, str(tiny_model_dir)) is None
    model = load_model(cfg, str(tiny_model_dir))
    assert not is_vision_model(model) and type(model) is type(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    )


def test_a_vision_model_whose_processor_cannot_load_is_a_clear_error(tmp_path):
    d = save_family("llava", tmp_path / "llava")
    (d / "processor_config.json").unlink(missing_ok=True)
    for f in d.glob("*preprocessor*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="vision-language model \\(llava\\)"):
        load_processor(ModelConfig(name_or_path=str(d)), str(d))


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_keeps_the_named_parts(family):
    _, model = build_family(family)
    line = freeze(model, ["vision"])
    parts = {part_of(n) for n, _ in model.named_parameters()}
    assert parts == {"vision", "projector", "language"}
    for name, p in model.named_parameters():
        assert p.requires_grad == (part_of(name) != "vision"), name
    assert "frozen vision; trained projector, language" in line
    freeze(model, ["vision", "projector"])
    assert all(p.requires_grad == (part_of(n) == "language") for n, p in model.named_parameters())
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())


def test_freeze_refuses_unknown_parts_and_freezing_everything():
    _, model = build_family("llava")
    with pytest.raises(ValueError, match="unknown part"):
        freeze(model, ["eyes"])
    with pytest.raises(ValueError, match="nothing would train"):
        freeze(model, ["vision", "projector", "language"])


def test_the_run_model_freezes_the_vision_tower_by_default(tmp_path):
    d = str(save_family("idefics3", tmp_path / "m"))
    proc = load_processor(ModelConfig(name_or_path=d), d)
    cfg = SFTConfig(model={"name_or_path": d})
    built = build_run_model(cfg, RunTokens(d, proc.tokenizer, len(proc.tokenizer)))
    assert any("frozen vision" in line for line in built.lines)
    assert all(p.requires_grad == (part_of(n) != "vision") for n, p in built.model.named_parameters())
    cfg = SFTConfig(model={"name_or_path": d, "freeze": ["vision", "projector"]})
    built = build_run_model(cfg, RunTokens(d, proc.tokenizer, len(proc.tokenizer)))
    assert not any(p.requires_grad for n, p in built.model.named_parameters() if "connector" in n)


def test_packing_is_refused_for_a_vision_model_and_text_rows_still_train(tmp_path, chat_file):
    from sftlab.config import ConfigError
    from sftlab.trainer.data import prepare_run_data

    d = str(save_family("llava", tmp_path / "m"))
    tree = {
        "model": {"name_or_path": d},
        "data": {"train": [str(chat_file)], "packing": "bfd", "max_seq_length": 256},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    with pytest.raises(ConfigError, match="data.packing is not supported for vision-language models"):
        prepare_run_data(SFTConfig.model_validate(tree))
    tree["data"]["packing"] = "none"
    data = prepare_run_data(SFTConfig.model_validate(tree))  # chat rows without images: parts, no pixels
    assert data.processor is not None and len(data.train) > 0
    batch = data.collate([data.units[0], data.units[1]])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2
