"""Greedy chat generation, and exact-match accuracy against reference assistant answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.config import MatchEvalConfig
from sftlab.data.formats import BadRecord, iter_jsonl, to_conversation


@torch.no_grad()
def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     conversations: list[list[dict[str, Any]]], max_new_tokens: int = 128,
                     batch_size: int = 16, template: str | None = None) -> list[str]:
    """Greedy-decode the assistant's next reply for each conversation (batched, left-padded)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                                     chat_template=template)
                       for c in conversations[i:i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]
            replies.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


@dataclass
class MatchResult:
    correct: int
    total: int
    samples: list[tuple[str, str, str]]  # (prompt, reference, prediction)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_match_examples(cfg: MatchEvalConfig) -> list[tuple[list[dict[str, Any]], str]]:
    """(prompt messages, reference answer) pairs: the reference is the last assistant message."""
    examples = []
    for lineno, row in iter_jsonl(cfg.path):
        if isinstance(row, BadRecord):
            raise row
        conv = to_conversation(row, "auto", cfg.path, lineno)
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        examples.append((conv.messages[:last], conv.messages[last]["content"]))
        if cfg.max_examples and len(examples) >= cfg.max_examples:
            break
    return examples


def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: MatchEvalConfig,
                template: str | None = None) -> MatchResult:
    examples = load_match_examples(cfg)
    preds = generate_replies(model, tokenizer, [p for p, _ in examples], cfg.max_new_tokens,
                             cfg.batch_size, template)
    correct = sum(pred.strip() == ref.strip() for (_, ref), pred in zip(examples, preds))
    samples = [(p[-1]["content"], ref, pred) for (p, ref), pred in zip(examples, preds)]
    return MatchResult(correct, len(examples), samples)
