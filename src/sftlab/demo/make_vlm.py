"""Build the vision-language demo (`make demo-vlm`): a task, its images and a tiny LLaVA model, seeded.

`python -m sftlab.demo.make_vlm DIR` writes into DIR (once; again only when missing or with --force):

- `img/*.png`: 32x32 pictures of one filled shape (square, disc or bar, at a random place and size)
  in one of six colours (shades jittered) on a noisy light background;
- `train.jsonl` (600 rows) and `eval.jsonl` (60 rows, other pictures): LLaMA-Factory rows
  `{"messages": [user "<image>What colour is the shape?", assistant "<colour>"], "images": [path]}`;
- `model/`: a LLaVA model (CLIP vision tower, Llama language model: 2 layers of width 64 each) with
  random weights from a fixed seed, its byte-level BPE tokenizer trained on the task's words and
  llava-1.5's chat template (with an end-of-turn token), saved with its processor: a model that has
  never seen an image, and learns to name the colour it is shown (src/sftlab/demo/demo_vlm.yaml).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
QUESTION = "What colour is the shape?"
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
SIZE, PATCH, WIDTH = 32, 8, 64
ROWS = {"train": 600, "eval": 60}
SEED = 0


def picture(rng: random.Random, colour: str) -> Image.Image:
    """One filled shape of `colour` (shade jittered) on a noisy light background."""
    g = np.random.default_rng(rng.randrange(1 << 30))
    background = g.integers(170, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(background, "RGB")
    fill = tuple(int(min(255, max(0, c + rng.randint(-25, 25)))) for c in COLOURS[colour])
    w, h = rng.randint(10, 20), rng.randint(10, 20)
    x, y = rng.randint(0, SIZE - w), rng.randint(0, SIZE - h)
    draw = ImageDraw.Draw(image)
    shape = rng.choice(("square", "disc", "bar"))
    if shape == "disc":
        draw.ellipse([x, y, x + w, y + h], fill=fill)
    elif shape == "bar":
        draw.rectangle([x, y + h // 3, x + w, y + 2 * h // 3], fill=fill)
    else:
        draw.rectangle([x, y, x + w, y + h], fill=fill)
    return image


def write_task(out: Path) -> None:
    rng = random.Random(SEED)
    (out / "img").mkdir(parents=True, exist_ok=True)
    for split, n in ROWS.items():
        rows = []
        for k in range(n):
            colour = list(COLOURS)[k % len(COLOURS)] if split == "eval" else rng.choice(list(COLOURS))
            name = f"img/{split}-{k:04d}.png"
            picture(rng, colour).save(out / name)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"<image>{QUESTION}"},
                        {"role": "assistant", "content": colour},
                    ],
                    "images": [name],
                }
            )
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = ["USER: ASSISTANT: SYSTEM:", QUESTION, " ".join(COLOURS), "\n", "0123456789 .,:;!?'\"()-"] * 8
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = TEMPLATE
    return fast


def write_model(out: Path) -> None:
    tok = build_tokenizer()
    images = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor = LlavaProcessor(
        images,
        tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
    )
    cfg = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(cfg).float()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/demo-vlm-data")
    parser.add_argument("--force", action="store_true", help="write everything again")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stamp = out / ".complete"
    if stamp.is_file() and not args.force:
        print(f"demo task and model already in {out}")
        return
    write_task(out)
    write_model(out)
    stamp.write_text("1\n")
    print(f"wrote {sum(ROWS.values())} pictures, train.jsonl, eval.jsonl and a tiny LLaVA model to {out}")


if __name__ == "__main__":
    main()
