"""Model surgery for a grown vocabulary: new embedding rows for tokens added to the tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def resize_for_new_tokens(
    model: Any, tokenizer: PreTrainedTokenizerBase, vocab_before: int, multiple_of: int | None = None
) -> None:
    """Size the model to a tokenizer that grew from `vocab_before` tokens, and use its eos.

    Embedding rows are added when the model has fewer than `len(tokenizer)` (rounded up to a multiple
    of `multiple_of`, data.pad_vocab_to_multiple_of); the rows of the new token ids and the padding
    rows after them start at the mean of the trained rows, in the embeddings and in an untied LM head.
    """
    rows_before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows_before:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple_of, mean_resizing=False)
    rows_after = model.get_input_embeddings().weight.shape[0]
    new_rows = list(range(vocab_before, max(len(tokenizer), rows_after if rows_after > rows_before else 0)))
    trained = min(vocab_before, rows_before)
    if new_rows:
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        with torch.no_grad():
            for weight in [emb] + ([head.weight] if head is not None and head.weight is not emb else []):
                weight[new_rows] = weight[:trained].float().mean(dim=0, keepdim=True).to(weight.dtype)
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
