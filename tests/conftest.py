"""Shared fixtures: a tiny BPE tokenizer with a ChatML template and a tiny random Llama, built in code, and a
count of the data sources read (what the tokenized-data cache saves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sftlab.compat import accelerate as accelerate_compat
from sftlab.data import dataset

# SmolLM2-135M-Instruct's template: ChatML without {% generation %} tags, default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant tool",
    "What is the capital of France? The capital of France is Paris.",
    "Convert the date to YYYY-MM-DD format. March 5, 2021 is 2021-03-05.",
    "Hello! How can I help you today? Tell me a joke. Why did the chicken cross the road?",
    "0123456789 - , . ! ? : ; ' \" ( ) [ ] { } = + * / \\ _ # @ $ % & < > | ~ `",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Numbers: one two three four five six seven eight nine ten eleven twelve.",
    "Sure, here is a list: apples, bananas, cherries. Thanks, that's great!",
]


def build_tokenizer(template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = template
    return fast


def build_model(vocab_size: int, seed: int = 0, layers: int = 2, positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(autouse=True, scope="session")
def _isolated_data_cache(tmp_path_factory):
    """Tests never read or write the user's data cache or compile-time records (the converted GGUF model cache
    stays shared)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SFTLAB_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
    mp.setenv("SFTLAB_COMPILE_TIMES", str(tmp_path_factory.mktemp("compile") / "compile_times.json"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_accelerator_state_left():
    """Each test starts without the AcceleratorState an earlier one left (its mixed precision would be
    reused silently by `Accelerator(cpu=True)`: a bf16 run's autocast in an fp32 test)."""
    accelerate_compat.reset_state()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture()
def calls(monkeypatch) -> dict[str, int]:
    """Count how often a source is read and tokenized (`calls["n"]`; a cache hit reads nothing)."""
    count = {"n": 0}
    real = dataset.read_source

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "read_source", counting)
    return count


@pytest.fixture()
def tiny_model(tokenizer) -> LlamaForCausalLM:
    return build_model(len(tokenizer))


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer) -> Path:
    """A saved tiny model + tokenizer directory, loadable like any HF checkpoint."""
    return save_tiny_model(tmp_path / "tiny-model", tokenizer)


def save_tiny_model(d: Path, tokenizer, positions: int = 512) -> Path:
    """Write the tiny model and `tokenizer` to `d` (for fixtures of any scope)."""
    build_model(len(tokenizer), positions=positions).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "Convert the date to YYYY-MM-DD format."},
        {"role": "user", "content": "March 5, 2021"},
        {"role": "assistant", "content": "2021-03-05"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Sure, that's great!"},
    ],
]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows())


def chat_rows() -> list[dict]:
    """The rows of `chat_file`: the conversations 4 times, then a prompt/completion row 4 times."""
    rows = [{"messages": c} for c in CONVERSATIONS] * 4
    return rows + [{"prompt": "Numbers: one two", "completion": "three four five"}] * 4


@pytest.fixture()
def no_hub(monkeypatch) -> list[str]:
    """Record (and refuse) every way of asking the Hugging Face Hub: its download functions, the HfApi calls
    transformers makes and any name lookup on the network. A test asserts the returned list is empty."""
    import socket

    import huggingface_hub
    from huggingface_hub import file_download
    from transformers.utils import hub as transformers_hub

    asked: list[str] = []

    def refused(name: str):
        def refuse(*args, **kwargs):
            asked.append(f"{name}{args}")
            raise AssertionError(f"the Hugging Face Hub was asked: {name}{args}")

        return refuse

    for module in (huggingface_hub, file_download, transformers_hub):
        for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refused(name))
    for name in ("hf_hub_download", "snapshot_download", "list_repo_tree", "model_info", "file_exists"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, refused(f"HfApi.{name}"))
    monkeypatch.setattr(socket, "getaddrinfo", refused("socket.getaddrinfo"))
    return asked


def write_group_store(directory: Path, groups: list, side: dict | None = None, lines: list | None = None):
    """A store with a group layout (data/store.py) holding `groups`: each a list of (ids, labels) sequences;
    `side`: name -> one value per group (float32). Written in two chunks; returns it opened (verified)."""
    import numpy as np

    from sftlab.data.store import ArrayWriter, TokenArrays, example_arrays

    side = side or {}
    writer = ArrayWriter(directory, "uint32", groups=True, side={name: "float32" for name in side})
    half = (len(groups) + 1) // 2
    for a, b in ((0, half), (half, len(groups))):
        seqs = [example_arrays(ids, labels) for group in groups[a:b] for ids, labels in group]
        writer.append("ids", np.concatenate([s[0] for s in seqs]) if seqs else np.zeros(0))
        writer.append("targets", np.concatenate([s[1] for s in seqs]) if seqs else np.zeros(0))
        starts = np.cumsum([0] + [len(s[0]) for s in seqs])
        writer.add_examples(
            np.asarray([len(s[0]) for s in seqs], dtype=np.int64),
            np.asarray(lines[a:b] if lines else range(a + 1, b + 1), dtype=np.int64),
            np.zeros(b - a, dtype=np.int32),
            np.concatenate([s[2] + k for s, k in zip(seqs, starts)] + [np.zeros(0, np.int64)]),
            np.concatenate([s[3] for s in seqs] + [np.zeros(0, np.int64)]),
            group_sizes=np.asarray([len(g) for g in groups[a:b]], dtype=np.int64),
            side={name: np.asarray(values[a:b], dtype=np.float32) for name, values in side.items()},
        )
    writer.close()
    return TokenArrays(directory)
