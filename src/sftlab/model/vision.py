"""Vision-language models: find the processor that goes with a model, and freeze the parts a run does not train.

A model whose config has a `vision_config` is a vision-language model: it loads through
`AutoModelForImageTextToText` (loading.py) and its `AutoProcessor` (with the PIL image processor,
`use_fast=False`: torchvision is not needed; a sub-processor that needs it, such as Qwen2-VL's video
processor, is left out: model/processors.py) renders, expands image tokens and makes pixels
(data/vision.py). A text-only model has no processor here (None), and rows with images stay bad rows.

`freeze(model, parts)` keeps the named parts as they are: `vision` (the vision tower), `projector`
(the multimodal projector or connector; Qwen2-VL's `visual.merger`), `language` (the language
model, its embeddings and head). Parameters are told apart by the module names transformers uses
(`vision_tower`, `vision_model`, `visual`; `multi_modal_projector`, `connector`, `merger`).
`language_targets(model)` is what LoRA's `all-linear` means for such a model: the language model's
linear layers only; `full_precision_modules` is what QLoRA leaves unquantized (all but the language model).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoProcessor

from sftlab.config.schema import ModelConfig
from sftlab.model.loading import ModelLoadError
from sftlab.model.processors import without_optional_parts

PARTS = ("vision", "projector", "language")
_PROJECTOR = {
    "multi_modal_projector",
    "connector",
    "merger",
    "mm_projector",
    "projector",
    "multimodal_projector",
}
_VISION = {"vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"}


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def is_vision_model(model: Any) -> bool:
    return is_vision_config(getattr(model, "config", None))


def _vision_config(cfg: ModelConfig, path: str) -> Any:
    """The config at `path` when it is a vision-language model's; None otherwise (or unreadable: loading the
    model names that problem)."""
    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - loading the model names the problem
        return None
    return config if is_vision_config(config) else None


def load_processor(cfg: ModelConfig, path: str) -> Any:
    """The processor of a vision-language model at `path` (PIL image processor); None for a text-only model."""
    config = _vision_config(cfg, path)
    if config is None:
        return None
    kwargs = {"use_fast": False, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        try:
            processor = AutoProcessor.from_pretrained(path, **kwargs)
        except ImportError as e:  # a sub-processor needs a missing backend (a video processor: torchvision)
            processor = without_optional_parts(path, e, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the model named
        raise ModelLoadError(
            f"{path} is a vision-language model ({config.model_type}) but its processor cannot be "
            f"loaded: {type(e).__name__}: {e}"
        ) from e
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ModelLoadError(
            f"{path} is a vision-language model ({config.model_type}) but its processor has no "
            "image processor and tokenizer (processor_config.json / preprocessor_config.json)"
        )
    return processor


def full_precision_modules(cfg: ModelConfig, path: str) -> list[str] | None:
    """QLoRA: what bitsandbytes must leave unquantized in the model at `path` (patterns for
    BitsAndBytesConfig.llm_int8_skip_modules, matched from the start of a module's full name or as its
    suffix): for a vision-language model the vision tower, the projector and the output head (they keep
    their weights, frozen); None for a text-only model (transformers' own default: the output head)."""
    if _vision_config(cfg, path) is None:
        return None
    return [rf"(?:.*\.)?{re.escape(name)}" for name in sorted(_VISION | _PROJECTOR)] + ["lm_head"]


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its module names."""
    segments = set(name.split("."))
    if segments & _PROJECTOR:
        return "projector"
    return "vision" if segments & _VISION else "language"


def language_targets(model: Any) -> str:
    """peft.target_modules `all-linear` for a vision-language model: a regular expression (peft matches it
    against full module names) for the language model's linear layers, the output head excluded; the
    vision tower and projector keep their weights."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaves = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and part_of(n) == "language"
        }
    )
    if not leaves:
        raise ValueError("peft: the model has no linear layers in its language model to put adapters on")
    other = "|".join(sorted(_VISION | _PROJECTOR))
    return rf"(?!(?:.*\.)?(?:{other})\.).*\.(?:{'|'.join(map(re.escape, leaves))})"


def freeze(model: Any, parts: list[str] | tuple[str, ...]) -> str:
    """Freeze `parts` of a vision-language model (requires_grad off); returns a line saying what trains."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"model.freeze: unknown part(s) {unknown} (expected some of {', '.join(PARTS)})")
    counts = {p: 0 for p in PARTS}
    for name, param in model.named_parameters():
        part = part_of(name)
        counts[part] += param.numel()
        if part in parts:
            param.requires_grad_(False)
    missing = [p for p in parts if counts[p] == 0]
    if missing:
        raise ValueError(
            f"model.freeze: the model ({type(model).__name__}) has no {' or '.join(missing)} parameters "
            "to freeze (parts are told apart by module names)"
        )
    trained = [p for p in PARTS if p not in parts and counts[p]]
    if not trained:
        raise ValueError("model.freeze: every part is frozen, nothing would train")
    return (
        f"model: frozen {', '.join(parts) or 'nothing'}; trained {', '.join(trained)} "
        f"({sum(counts[p] for p in trained):,} of {sum(counts.values()):,} parameters)"
    )
