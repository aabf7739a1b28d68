"""Chat generation (greedy, or sampled with a temperature and top-p), and exact-match accuracy against
reference assistant answers (greedy). Tool schemas given for generation must be rendered by the chat
template (checked as for training rows, data/rendering.py), or it is a DataError. A vision-language
model's prompts carry images and are generated through its processor (vision_generate.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.config.schema import MatchEvalConfig
from sftlab.data.images import image_record
from sftlab.data.records import ColumnMap, Conversation, to_record
from sftlab.data.rendering import TOOL_TEMPLATES, template_support
from sftlab.data.sources import iter_jsonl
from sftlab.data.types import BadRecord, DataError
from sftlab.model.vision_generate import generate_vision_replies, part_text, with_images


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    template: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: list[dict[str, Any]] | None = None,
) -> list[str]:
    """The assistant's next reply for each conversation (batched, left-padded): greedy when
    `temperature` is 0, else sampled at that temperature from the top-p nucleus (no top-k cut). `tools`:
    function schemas handed to the chat template (rendered where the template renders tools)."""
    _check_tools(tokenizer, template, tools)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [
                tokenizer.apply_chat_template(
                    c,
                    tokenize=False,
                    add_generation_prompt=True,
                    chat_template=template,
                    **({"tools": tools} if tools else {}),
                )
                for c in conversations[i : i + batch_size]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            replies.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def _check_tools(
    tokenizer: PreTrainedTokenizerBase, template: str | None, tools: list[dict[str, Any]] | None
) -> None:
    """Tools the chat template does not render would never reach the model: a DataError instead."""
    text = template or getattr(tokenizer, "chat_template", None)
    if (
        tools
        and isinstance(text, str)
        and template_support(text, tokenizer.special_tokens_map).tools is False
    ):
        raise DataError(
            "tools were given, but the model's chat template does not render them (they would never "
            "reach the model); use a model whose template does, e.g. one trained with "
            f"data.chat_template: {' or '.join(TOOL_TEMPLATES)} (a run saves its template)"
        )


@dataclass
class MatchResult:
    correct: int
    total: int
    samples: list[tuple[str, str, str]]  # (prompt, reference, prediction)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_match_examples(
    cfg: MatchEvalConfig, images: bool = False, vocab_size: int | None = None
) -> list[tuple[list[dict[str, Any]], str]]:
    """(prompt messages, reference answer) pairs, validated before training starts: the reference is
    the last assistant message's text. A bad row is a DataError naming file:line and field. `images`: a
    vision-language model's rows, read with their images (data/images.py, paths relative to the file; the
    prompt's image parts carry their references, the reference is its text parts)."""
    examples = []
    columns = ColumnMap(cfg.columns, cfg.roles)
    try:
        for lineno, row in iter_jsonl(cfg.path):
            if isinstance(row, BadRecord):
                raise row
            conv = (
                image_record(
                    row,
                    "auto",
                    cfg.path,
                    lineno,
                    columns=columns,
                    base_dir=Path(cfg.path).parent,
                    vocab_size=vocab_size,
                )
                if images
                else to_record(row, "auto", cfg.path, lineno, columns=columns)
            )
            if not isinstance(conv, Conversation):
                raise BadRecord(
                    cfg.path, lineno, None, "match_eval rows must be conversations or prompt/completion"
                )
            last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
            reference = conv.messages[last].get("content")
            reference = part_text(reference) if images else reference
            if not isinstance(reference, str) or not reference.strip():
                raise BadRecord(
                    cfg.path, lineno, f"messages[{last}].content", "the reference answer must be text"
                )
            prompt = conv.messages[:last]
            examples.append((with_images(prompt, list(conv.images)) if images else prompt, reference))
            if cfg.max_examples and len(examples) >= cfg.max_examples:
                break
    except BadRecord as e:
        raise DataError(f"match_eval: {e}") from None
    except OSError as e:
        raise DataError(f"match_eval.path: cannot read {cfg.path}: {e.strerror or e}") from None
    if not examples:
        raise DataError(f"match_eval.path: {cfg.path} has no examples")
    return examples


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[list[dict[str, Any]], str]],
    cfg: MatchEvalConfig,
    template: str | None = None,
    processor: Any = None,
) -> MatchResult:
    """Greedy replies against the references; `processor`: a vision-language model's (prompts with images)."""
    prompts = [p for p, _ in examples]
    if processor is not None:
        preds = generate_vision_replies(
            model, processor, prompts, cfg.max_new_tokens, cfg.batch_size, template
        )
    else:
        preds = generate_replies(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, template)
    correct = sum(pred.strip() == ref.strip() for (_, ref), pred in zip(examples, preds))
    samples = [
        (part_text(p[-1].get("content")) if p else "", ref, pred) for (p, ref), pred in zip(examples, preds)
    ]
    return MatchResult(correct, len(examples), samples)
