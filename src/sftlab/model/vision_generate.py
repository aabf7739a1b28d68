"""Generation and exact-match prompts for a vision-language model: images in, the assistant's reply out.

A conversation here is messages whose content is parts; an image part carries its reference
(`{"type": "image", "image": path-or-image}`), as generate.py's `load_match_examples(images=True)` reads
match_eval rows (data/images.py: the same row formats as training, paths relative to the file) and as
`sftlab generate/chat --image` builds prompts (`image_prompt`). `generate_vision_replies` renders each
conversation with the processor's template (the image parts as its placeholders), lets the processor
expand the images and make pixels, and decodes greedy (or sampled) continuations, left-padded in batches.
"""

from __future__ import annotations

from typing import Any

import torch

from sftlab.data.vision import load_image


def part_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def with_images(messages: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
    """The conversation with each image part given its reference, in order (`images` as many as the image
    parts); with more images than parts, the rest go first in the last user message."""
    refs = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image", "image": next(refs)} if p.get("type") == "image" else p for p in content
            ]
        out.append({**m, "content": content})
    rest = list(refs)
    if rest:
        last = max(i for i, m in enumerate(out) if m["role"] == "user")
        content = out[last]["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        out[last] = {**out[last], "content": [{"type": "image", "image": r} for r in rest] + parts}
    return out


def image_prompt(messages: list[dict[str, Any]], images: list[Any]) -> list[dict[str, Any]]:
    """A text conversation with `images` shown first in its first user message (content as parts)."""
    out = [
        {
            **m,
            "content": m["content"]
            if isinstance(m.get("content"), list)
            else [{"type": "text", "text": m.get("content") or ""}],
        }
        for m in messages
    ]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first] = {
        **out[first],
        "content": [{"type": "image", "image": r} for r in images] + out[first]["content"],
    }
    return out


def _split(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with bare image parts, their references in order)."""
    refs: list[Any] = []
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            refs += [p.get("image") for p in content if p.get("type") == "image"]
            content = [{"type": "image"} if p.get("type") == "image" else p for p in content]
        out.append({**m, "content": content})
    return out, refs


@torch.no_grad()
def generate_vision_replies(
    model: Any,
    processor: Any,
    conversations: list[list[dict[str, Any]]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    template: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The assistant's next reply for each conversation (image parts carrying their references)."""
    tok = processor.tokenizer
    template = template or getattr(processor, "chat_template", None) or tok.chat_template
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    replies: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            prompts, images = [], []
            for conv in conversations[i : i + batch_size]:
                messages, refs = _split(conv)
                prompts.append(
                    processor.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True, chat_template=template
                    )
                )
                images.append([load_image(r) for r in refs])
            enc = processor(
                text=prompts,
                images=images if any(images) else None,
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,
            )
            enc = {k: v.to(model.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                **sampling,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            replies.extend(tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tok.padding_side = side
        model.train(was_training)
    return replies
