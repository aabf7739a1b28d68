"""Load a saved processor whose optional sub-processor cannot load here: the processor built from the parts that do.

`AutoProcessor.from_pretrained` loads every sub-processor a processor class names; one that needs a
backend this environment lacks (Qwen2-VL's video processor needs torchvision) makes the whole
processor fail with an ImportError, although training on images needs only the tokenizer and the
image processor. `without_optional_parts` finds the processor class as transformers does (the
`processor_class` of processor_config.json, preprocessor_config.json, video_preprocessor_config.json
or tokenizer_config.json, else the model type's processor), loads each sub-processor the class names
(its `get_attributes()`) the way transformers loads it, and builds the processor without those that
raise an ImportError (a `_Partial` subclass of the class, named like it). The tokenizer and the image
processor are required. Saving the result writes the left-out parts' settings back (the
processor_config.json of the original), so the saved directory loads again the same way here, and
fully where the backend is installed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from transformers import AutoConfig
from transformers.processing_utils import ProcessorMixin

from sftlab.compat import transformers as transformers_compat

log = logging.getLogger(__name__)

_CLASS_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
)
REQUIRED = ("tokenizer", "image_processor")


def _saved_class_name(path: str, hub: dict[str, Any]) -> str | None:
    for name in _CLASS_FILES:
        file = transformers_compat.cached_file_or_none(path, name, **hub)
        if file is None:
            continue
        with open(file, encoding="utf-8") as f:
            found = json.load(f).get("processor_class")
        if found:
            return found
    return None


def processor_class(path: str, **hub: Any) -> type | None:
    """The processor class AutoProcessor would build for `path` (None when it names none)."""
    name = _saved_class_name(path, hub)
    cls = transformers_compat.processor_class_named(name) if name else None
    if cls is None:
        cls = transformers_compat.processor_class_for_config(AutoConfig.from_pretrained(path, **hub))
    return cls if isinstance(cls, type) and issubclass(cls, ProcessorMixin) else None


class _Partial(ProcessorMixin):
    """Sits between a processor class and ProcessorMixin: drops the sub-processors that did not load from
    what the class's __init__ passes on (by name or by place), and writes their settings back when saved."""

    _all_parts: tuple[str, ...] = ()
    _left_out: dict[str, Any] = {}  # part -> its saved settings (None when there were none)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        named = dict(zip(self._all_parts, args))
        named.update(kwargs)
        for part in self._left_out:
            named.pop(part, None)
        super().__init__(**named)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update({k: v for k, v in self._left_out.items() if v is not None})
        out["processor_class"] = type(self).__name__
        return out


def _saved_settings(part: str, path: str, processor_dict: dict, hub: dict) -> Any:
    if isinstance(processor_dict.get(part), dict):
        return processor_dict[part]
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    readers = {
        "video_processor": BaseVideoProcessor.get_video_processor_dict,
        "image_processor": ImageProcessingMixin.get_image_processor_dict,
        "feature_extractor": FeatureExtractionMixin.get_feature_extractor_dict,
    }
    reader = next((r for k, r in readers.items() if k in part), None)
    try:
        return reader(path, **hub)[0] if reader else None
    except (OSError, ValueError):
        return None


def without_optional_parts(path: str, error: ImportError, **kwargs: Any) -> Any:
    """The processor at `path` built without the sub-processors that raise an ImportError here (`error`:
    AutoProcessor's). Re-raises `error` when the processor class is unknown, when the tokenizer or the
    image processor is among them, or when every part loads (the ImportError came from elsewhere)."""
    hub = {k: kwargs[k] for k in ("revision", "trust_remote_code") if kwargs.get(k) is not None}
    cls = processor_class(path, **hub)
    if cls is None:
        raise error
    processor_dict, init_kwargs = cls.get_processor_dict(path, **kwargs)
    parts, loaded, left_out = cls.get_attributes(), [], {}
    for part in parts:
        try:
            loaded.append(transformers_compat.load_processor_part(cls, part, path, processor_dict, kwargs))
        except ImportError as e:
            if any(r == part for r in REQUIRED):
                raise error from e
            left_out[part] = (_saved_settings(part, path, processor_dict, hub), e)
            loaded.append(None)
    if not left_out:
        raise error
    partial = type(
        cls.__name__,
        (cls, _Partial),
        {
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
            "_all_parts": tuple(parts),
            "_left_out": {k: v[0] for k, v in left_out.items()},
            "get_attributes": classmethod(lambda c: [p for p in parts if p not in left_out]),
        },
    )
    processor = partial.from_args_and_dict(loaded, processor_dict, **init_kwargs)
    why = "; ".join(f"{k}: " + str(v[1]).strip().split(". ")[0].rstrip(".") for k, v in left_out.items())
    log.warning(
        "%s: loaded %s without its %s (%s); %s not supported in this environment",
        path,
        cls.__name__,
        ", ".join(left_out),
        why,
        "videos are" if any("video" in k for k in left_out) else "they are",
    )
    return processor
