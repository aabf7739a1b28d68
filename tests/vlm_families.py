"""Tiny vision-language families built in code (random weights, PIL image processors): Idefics3
(SmolVLM's architecture), Qwen2-VL and LLaVA, each as (processor, model) or a saved directory that
AutoProcessor and AutoModelForImageTextToText load. Their chat templates follow the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import build_tokenizer
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# SmolVLM's template (content parts only; `<image>` per image part, `<end_of_utterance>` ends a turn)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Qwen2-VL's template (default system prompt; strings or parts; an image renders as vision_start/pad/end)
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-1.5-hf's template without its generation tags and with an end of turn: images first, then texts
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# what Qwen2-VL's video processor saves (transformers 5.x, Qwen2VLVideoProcessor's defaults)
QWEN2VL_VIDEO = {
    "video_processor_type": "Qwen2VLVideoProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_sample_frames": False,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 256, "shortest_edge": 64},
}

FAMILIES = ("idefics3", "qwen2_vl", "llava")
HIDDEN = 32


def _text_config(vocab: int, **extra) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )


def _idefics3(seed: int):
    tok = build_tokenizer("")
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<global-img>",
                "<end_of_utterance>",
                "<image>",
                "<fake_token_around_image>",
            ]
        }
    )
    images = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    proc = Idefics3Processor(images, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    cfg = Idefics3Config(
        text_config={"model_type": "llama", **_text_config(len(tok))},
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=proc.image_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return proc, Idefics3ForConditionalGeneration(cfg)


def _qwen2_vl(seed: int):
    tok = build_tokenizer("")
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|vision_start|>",
                "<|image_pad|>",
                "<|vision_end|>",
                "<|video_pad|>",
            ]
        }
    )
    images = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=16 * 16
    )
    proc = _Qwen2VLImagesOnly(images, tok, chat_template=QWEN2VL_TEMPLATE)
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    }
    cfg = Qwen2VLConfig(
        text_config=_text_config(
            len(tok),
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=1,
            embed_dim=HIDDEN,
            hidden_size=HIDDEN,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return proc, Qwen2VLForConditionalGeneration(cfg)


def _llava(seed: int, text_hidden: int = HIDDEN):
    tok = build_tokenizer("")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        images,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    cfg = LlavaConfig(
        text_config=LlamaConfig(
            **{**_text_config(len(tok)), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden}
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return proc, LlavaForConditionalGeneration(cfg)


class _Qwen2VLImagesOnly(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision, absent here)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


BUILDERS = {"idefics3": _idefics3, "qwen2_vl": _qwen2_vl, "llava": _llava}


def build_family(family: str, seed: int = 0, **sizes):
    """(processor, model) of a tiny random `family` model in float32 (`sizes`: LLaVA's `text_hidden`)."""
    proc, model = BUILDERS[family](seed, **sizes)
    return proc, model.float()


def save_family(family: str, d: Path, seed: int = 0, **sizes) -> Path:
    """A saved directory holding the tiny model and its processor (tokenizer, image processor, template).
    Qwen2-VL's is written as a real one is (`Qwen2VLProcessor` with its video processor's settings, which
    AutoProcessor cannot load without torchvision)."""
    proc, model = build_family(family, seed, **sizes)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    if family == "qwen2_vl":
        for name in ("processor_config.json", "tokenizer_config.json"):
            saved = json.loads((d / name).read_text())
            saved["processor_class"] = "Qwen2VLProcessor"
            if name == "processor_config.json":
                saved["video_processor"] = {
                    **QWEN2VL_VIDEO,
                    **{
                        k: saved["image_processor"][k]
                        for k in ("patch_size", "merge_size", "temporal_patch_size")
                    },
                }
            (d / name).write_text(json.dumps(saved, indent=2))
    return d


def make_image(path: Path | None = None, size: tuple[int, int] = (16, 16), seed: int = 0) -> Image.Image:
    """A small random RGB image (saved to `path` as PNG when given)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return image


def write_image_rows(d: Path) -> Path:
    """d/vlm.jsonl: 12 image rows (16x16 images under d/img) of four prompt lengths (padded batches)."""
    rows = []
    for k in range(12):
        make_image(d / "img" / f"{k}.png", size=(16, 16), seed=k)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>Which class?" + " really" * (k % 4)},
                    {"role": "assistant", "content": f"Class {k % 3}."},
                ],
                "images": [f"img/{k}.png"],
            }
        )
    (d / "vlm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "vlm.jsonl"
