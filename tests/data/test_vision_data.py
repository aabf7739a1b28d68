"""Vision-language examples (data/vision.py) on tiny random models of three families: the processor's own
expansion, the text path's masks, image tokens never targets, pixel batches and padding-invariant losses."""

from __future__ import annotations

import pytest
import torch
from vlm_families import FAMILIES, build_family, make_image

from sftlab.data.tokenize import tokenize_conversation
from sftlab.data.types import IGNORE_INDEX, TemplateError
from sftlab.data.vision import (
    PACKING_REFUSAL,
    carry_labels,
    image_token_ids,
    load_image,
    tokenize_vision,
    vision_collate,
    vision_examples_from_jsonl,
)
from sftlab.model.loss import full_nll


def _conversation(n_images: int, answer: str = "The capital of France is Paris.") -> list[dict]:
    user = [{"type": "image"}] * n_images + [{"type": "text", "text": "What is the capital of France?"}]
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure, that's great!"}]},
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, *build_family(request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    return [
        str(make_image(d / f"{k}.png", size=(16 + 8 * k, 16), seed=k) and d / f"{k}.png") for k in range(3)
    ]


def test_one_row_renders_expands_and_masks_exactly(family, images):
    name, proc, _ = family
    messages = _conversation(2)
    ex = tokenize_vision(proc, messages, images[:2])
    # the processor's own rendering and expansion, the images inside the parts
    it = iter(images[:2])
    own = [
        {
            **m,
            "content": [
                {"type": "image", "path": next(it)} if p["type"] == "image" else p for p in m["content"]
            ],
        }
        for m in messages
    ]
    want = proc.apply_chat_template(own, tokenize=True, return_dict=True)["input_ids"][0]
    assert ex.input_ids == list(want)
    special = image_token_ids(proc)
    assert proc.tokenizer.convert_tokens_to_ids(proc.image_token) in special
    assert sum(t in special for t in ex.input_ids) > 4  # the images were expanded
    assert all(y == IGNORE_INDEX for t, y in zip(ex.input_ids, ex.labels) if t in special)
    # the targets are exactly the text path's, on the template text with the image placeholders
    text = tokenize_conversation(proc.tokenizer, messages, template=proc.chat_template)
    targets = [t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE_INDEX]
    assert targets == [t for t, y in zip(text.input_ids, text.labels) if y != IGNORE_INDEX]
    decoded = proc.tokenizer.decode(targets)
    assert "Paris." in decoded and "Sure, that's great!" in decoded and "capital of France?" not in decoded
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(ex.input_ids, ex.labels))


def test_collate_gives_the_processors_own_pixel_inputs(family, images):
    name, proc, _ = family
    ex = tokenize_vision(proc, _conversation(2), images[:2])
    batch = vision_collate([ex], proc, proc.tokenizer.pad_token_id)
    text = proc.apply_chat_template(_conversation(2), tokenize=False)
    own = proc(
        text=[text],
        images=[[load_image(r) for r in images[:2]]],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert set(own) - {"attention_mask"} <= set(batch), set(own) - set(batch)
    for key, value in own.items():
        assert torch.equal(batch[key], value), key


def test_padded_batches_of_different_image_counts_lose_as_each_row_alone(family, images):
    name, proc, model = family
    examples = [
        tokenize_vision(proc, _conversation(k, answer), images[:k])
        for k, answer in ((2, "Paris."), (0, "The capital of France is Paris, Paris."), (1, "Paris!"))
    ]
    pad = proc.tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        together = full_nll(model, vision_collate(examples, proc, pad))
        alone = sum(full_nll(model, vision_collate([ex], proc, pad)) for ex in examples)
    targets = sum(ex.num_targets for ex in examples)
    assert torch.allclose(together / targets, alone / targets, atol=1e-5, rtol=1e-5)


def test_one_optimizer_step_runs_and_moves_the_trained_weights(family, images):
    name, proc, model = family
    examples = [tokenize_vision(proc, _conversation(k), images[:k]) for k in (1, 2)]
    batch = vision_collate(examples, proc, proc.tokenizer.pad_token_id)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = full_nll(model, batch) / sum(ex.num_targets for ex in examples)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lm_head" in n for n in moved) and len(moved) > len(before) // 2


def test_image_counts_must_match_and_mismatched_expansions_are_refused(family, images):
    name, proc, _ = family
    with pytest.raises(TemplateError, match="2 image part"):
        tokenize_vision(proc, _conversation(2), images[:1])
    with pytest.raises(TemplateError, match="changed the text"):
        carry_labels([5, 6, 7], [5, 6, 7], [5, 9, 7], {100})
    assert carry_labels([5, 100, 7], [-100, -100, 7], [5, 101, 100, 100, 101, 7], {100, 101}) == [
        -100,
        -100,
        -100,
        -100,
        -100,
        7,
    ]
    assert "packing" in PACKING_REFUSAL


def test_a_llamafactory_file_gives_examples_and_names_its_bad_rows(family, tmp_path):
    import json

    name, proc, model = family
    make_image(tmp_path / "mllm_demo_data" / "1.png")
    make_image(tmp_path / "mllm_demo_data" / "2.png", size=(24, 16), seed=2)
    good = {
        "messages": [
            {"content": "<image>Who are they?", "role": "user"},
            {"content": "They're football players.", "role": "assistant"},
            {"content": "What are they doing?<image>", "role": "user"},
            {"content": "They are playing.", "role": "assistant"},
        ],
        "images": ["mllm_demo_data/1.png", "mllm_demo_data/2.png"],
    }
    rows = [
        good,
        {**good, "images": ["mllm_demo_data/1.png"]},
        {**good, "images": ["mllm_demo_data/1.png", "x.png"]},
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]},
    ]
    path = tmp_path / "mllm_demo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, bad = vision_examples_from_jsonl(path, proc)
    assert [len(ex.images) for ex in examples] == [2, 0]
    assert [(b.line, b.field_name) for b in bad] == [(2, "images"), (3, "images[1]")]
    assert "x.png" in str(bad[1]) and str(bad[0]).startswith(f"{path}:2 field 'images'")
    _, too_long = vision_examples_from_jsonl(path, proc, max_length=20)
    assert any("not truncated" in str(b) for b in too_long)
    batch = vision_collate(examples, proc, proc.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(full_nll(model, batch))
