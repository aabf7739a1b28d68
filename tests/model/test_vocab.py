"""Resizing the model for tokens added to the tokenizer (ChatML tokens on a base tokenizer)."""

from __future__ import annotations

import logging

import torch
from conftest import build_model
from data.test_templates import CHAT, plain_tokenizer

from sftlab.data.templates import add_chatml_tokens, resolve_template
from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX
from sftlab.model.vocab import resize_for_new_tokens


def test_add_chatml_tokens_resizes_with_mean_rows(caplog):
    tok = plain_tokenizer()
    n = len(tok)
    model = build_model(n)
    old_mean = model.get_input_embeddings().weight.detach().mean(0).clone()
    with caplog.at_level(logging.WARNING):
        assert add_chatml_tokens(tok) == 2
    resize_for_new_tokens(model, tok, n)
    assert "modules_to_save" in caplog.text
    assert len(tok) == n + 2 and tok.eos_token == "<|im_end|>"
    ids = tok("<|im_start|>user\nHello!<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 2 and model.config.eos_token_id == tok.eos_token_id
    assert torch.allclose(emb[n], old_mean) and torch.allclose(emb[n + 1], old_mean)
    assert model.get_output_embeddings().weight.shape[0] == n + 2
    # the chatml built-in now tokenizes and masks on this base tokenizer
    ex = tokenize_conversation(tok, CHAT[1:3], "assistant", template=resolve_template("chatml", tok))
    assert (
        tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
        == "Hello! How can I help you today?<|im_end|>"
    )


def test_resize_after_loading_the_model_like_training_does():
    """Training adds the tokens before the weights are loaded, then resizes."""
    tok = plain_tokenizer()
    n = len(tok)
    add_chatml_tokens(tok)
    model = build_model(n)
    untied = model.get_output_embeddings().weight
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(untied.detach().clone() + 1.0)
    emb_mean = model.get_input_embeddings().weight.detach().mean(0).clone()
    head_mean = model.lm_head.weight.detach().mean(0).clone()
    resize_for_new_tokens(model, tok, n)
    assert model.get_input_embeddings().weight.shape[0] == n + 2 and model.lm_head.weight.shape[0] == n + 2
    assert torch.allclose(model.get_input_embeddings().weight[n:], emb_mean.expand(2, -1))
    assert torch.allclose(model.lm_head.weight[n:], head_mean.expand(2, -1))
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_pad_vocab_to_multiple_of_rounds_the_rows_up_with_mean_rows():
    tok = plain_tokenizer()
    n = len(tok)
    model = build_model(n)
    old_mean = model.get_input_embeddings().weight.detach().mean(0).clone()
    add_chatml_tokens(tok)
    resize_for_new_tokens(model, tok, n, multiple_of=64)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= n + 2
    assert all(torch.allclose(emb[i], old_mean) for i in range(n, emb.shape[0]))
