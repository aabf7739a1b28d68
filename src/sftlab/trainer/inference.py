"""Load any model for inference (`sftlab generate`, `chat`, `eval`): (model, tokenizer), fp32, KV cache on.

What `load_model_dir(spec)` takes:

- `default` (the embedded SmolLM2-135M-Instruct), a hub id, a Hugging Face model directory or a
  .gguf file: through `model/loading.py`, as training loads them;
- a run directory: its saved model, or a LoRA run's adapter merged into its base; a run that never
  finished (no saved model): its latest complete checkpoint;
- a checkpoint directory (`output_dir/checkpoints/step-N`, trainer/checkpoint.py): the model is rebuilt
  from the resolved config stored in its `trainer_state.json` (base model, ChatML tokens, chat template,
  LoRA wrapping) and the weights of its `model.safetensors` are loaded into it: every weight for full
  fine-tuning, only the trainable adapter tensors with LoRA (merged into the base afterwards). When bf16
  compute copies were saved, the exact fp32 master weights are taken from `optimizer.bin`.

`reply_function` is what `sftlab generate/chat` answer with: the loaded model and its sampling settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from sftlab.compat import torch as torch_compat
from sftlab.config.loading import load_config
from sftlab.config.schema import ConfigError, ModelConfig, SFTConfig
from sftlab.data.templates import load_template
from sftlab.data.toolcalls import read_tools_file
from sftlab.model import adapters
from sftlab.model.generate import generate_replies
from sftlab.model.loading import (
    check_model_spec,
    load_model,
    load_tokenizer,
    resolve_model_path,
    with_pad_token,
)
from sftlab.model.sampling import check_sampling
from sftlab.trainer import distributed
from sftlab.trainer.checkpoint import (
    COMPLETE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    read_state,
)
from sftlab.trainer.data import load_run_tokens
from sftlab.trainer.master_weights import MASTER_KEY
from sftlab.trainer.optim import decay_groups
from sftlab.trainer.run_model import build_run_model

log = logging.getLogger(__name__)


def is_checkpoint_dir(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def load_model_dir(spec: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of `default`, a hub id, a model/run/checkpoint directory or a .gguf file. A local
    path (a `Path`, `./run`, `/abs`, `~/x`: sftlab.paths.is_local_path) that is not there fails at once,
    never looked up on the Hub."""
    if str(spec) == "default":  # the embedded model, even where a directory of that name exists
        return _load_plain(ModelConfig())
    check_model_spec(spec)
    path = Path(spec).expanduser()
    if adapters.is_adapter_dir(path):
        model, tokenizer = load_adapter_dir(path)
        return model.eval(), tokenizer
    if is_checkpoint_dir(path):
        return load_checkpoint_model(path)
    if path.is_dir() and not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ConfigError(
                f"{path} holds no model: no config.json (a saved model), adapter_config.json (a LoRA "
                f"run), {STATE_FILE} (a checkpoint) nor a complete checkpoint under checkpoints/"
            )
        log.info(
            "%s has no saved model (the run did not finish): loading its latest checkpoint %s",
            path,
            ckpt.name,
        )
        return load_checkpoint_model(ckpt)
    return _load_plain(ModelConfig(name_or_path=str(spec)))


def _load_plain(cfg: ModelConfig) -> tuple[Any, Any]:
    """A model as training loads it (model/loading.py): `default`, a hub id, a HF directory, a .gguf file."""
    resolved = resolve_model_path(cfg)
    model = load_model(cfg, resolved)
    model.config.use_cache = True
    return model.eval(), load_tokenizer(cfg, resolved)


def load_adapter_dir(path: str | Path) -> tuple[Any, Any]:
    """(fp32 model with the adapter merged in, tokenizer) of a directory holding a saved adapter (a LoRA
    run): its recorded base and the adapter, rebuilt as a run continuing it would (trainer/run_model.py)."""
    cfg = SFTConfig(model=ModelConfig(name_or_path=str(path)))
    tokens = load_run_tokens(cfg)
    model = build_run_model(cfg, tokens, purpose="load").model.merge_and_unload()
    model.config.use_cache = True
    return model, tokens.tokenizer


def run_config(spec: str | Path) -> SFTConfig | None:
    """The resolved config of a run directory (config.yaml) or a checkpoint (trainer_state.json), else None."""
    path = Path(spec)
    if (path / "config.yaml").is_file():
        return load_config(path / "config.yaml", require_data=False)
    if is_checkpoint_dir(path):
        return _checkpoint_config(path)
    return None


def _checkpoint_config(ckpt: Path) -> SFTConfig:
    try:
        return SFTConfig.model_validate(read_state(ckpt).config)
    except (KeyError, ValidationError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} holds no usable run config: {e}") from None


def load_checkpoint_model(ckpt: Path) -> tuple[Any, Any]:
    """The model of a checkpoint, rebuilt from its stored config as training built it
    (trainer/run_model.py), with its weights (module docstring)."""
    if not (ckpt / COMPLETE).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    cfg = _checkpoint_config(ckpt)
    tokens = load_run_tokens(cfg)
    template = load_template(cfg.data, tokens.tokenizer)
    if template is not None:
        tokens.tokenizer.chat_template = template
    model = build_run_model(cfg, tokens, purpose="load").model
    load_checkpoint_weights(model, ckpt)
    if cfg.peft is not None or tokens.adapter_dir:
        model = model.merge_and_unload()
    model.float()
    model.config.use_cache = True
    return model.eval(), tokens.tokenizer


def load_checkpoint_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's model.safetensors into `model`: it must hold exactly the trainable
    parameters (all of them for full fine-tuning); a tied head saved once is fine."""
    sharded = distributed.sharded_checkpoint_weights(ckpt, model)  # FSDP / DeepSpeed: the whole model, fp32
    if sharded is not None:
        result = model.load_state_dict(sharded, strict=False)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trainable & set(result.missing_keys):  # frozen weights: the base's own
            raise CheckpointError(
                f"{ckpt} does not match the model rebuilt from its config: unexpected "
                f"{result.unexpected_keys[:3]}, missing {sorted(trainable & set(result.missing_keys))[:3]}"
            )
        return
    weights = torch_compat.without_compile_prefix(load_file(str(ckpt / "model.safetensors")))
    if any(t.dtype != torch.float32 for t in weights.values()):
        weights.update(_master_weights(model, ckpt))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, set[str]] = {}  # tied weights: one tensor, several names (saved under one of them)
    for name, tensor in state.items():
        aliases.setdefault(tensor.data_ptr(), set()).add(name)
    covered = set().union(*(aliases[state[n].data_ptr()] for n in weights if n in state))
    unknown, missing = sorted(set(weights) - (trainable | covered)), sorted(trainable - covered)
    if unknown or missing:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not match the model rebuilt from its config: "
            f"{len(unknown)} unexpected tensors ({', '.join(unknown[:3])}), {len(missing)} "
            f"missing ({', '.join(missing[:3])})"
        )
    model.load_state_dict(weights, strict=False)


def _master_weights(model: torch.nn.Module, ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights that MasterWeightAdamW keeps in optimizer.bin, by parameter name (the
    optimizer's flat parameter index follows trainer/optim.py's `decay_groups`)."""
    path = ckpt / "optimizer.bin"
    if not path.is_file():
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    masters = state.get(MASTER_KEY) or {}
    names = [n for group in decay_groups(model) for n in group]
    indices = [i for g in state.get("param_groups", []) for i in g["params"]]
    if masters and len(indices) != len(names):
        raise CheckpointError(
            f"{path}: {len(indices)} optimized parameters, the rebuilt model has {len(names)}"
        )
    return {names[int(i)]: t.float() for i, t in masters.items()}


def reply_function(
    spec: str | Path,
    *,
    tools_file: str | None = None,
    images: list[str] | None = None,
    seed: int | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
):
    """`sftlab generate/chat`: the model of `spec` (`load_model_dir`) and a function (messages -> reply) with
    these sampling settings; `tools_file`: tool schemas (JSON) for the chat template; `images`: shown to a
    vision-language model (`image_reply`); `seed`: torch's, for repeatable sampling. Bad settings or a bad
    tools file fail before the model loads."""
    check_sampling(temperature, top_p)
    tools = read_tools_file(tools_file) if tools_file else None
    if seed is not None:
        torch.manual_seed(seed)
    model, tok = load_model_dir(spec)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    if images:
        return image_reply(model, spec, images, **settings)
    tok = with_pad_token(tok)
    return lambda messages: generate_replies(model, tok, [list(messages)], tools=tools, **settings)[0].strip()


def image_reply(model: Any, spec: str | Path, images: list[str], **settings: Any):
    """`sftlab generate/chat --image`: a function (messages -> reply) for a vision-language model that shows
    it `images` (paths) in the first user message; the processor is the one saved with the model (a run
    directory holds it) or, for a LoRA run or a checkpoint, its base model's."""
    from sftlab.model.vision import is_vision_model
    from sftlab.model.vision_generate import generate_vision_replies, image_prompt

    if not is_vision_model(model):
        raise ConfigError(
            f"--image: {spec} is a text-only model (no vision_config); images need a vision-language model"
        )
    processor = model_processor(model, spec)
    for path in images:
        if not Path(path).is_file():
            raise ConfigError(f"--image: no such file: {path}")
    paths = [str(Path(p).resolve()) for p in images]
    return lambda messages: generate_vision_replies(
        model, processor, [image_prompt(messages, paths)], **settings
    )[0].strip()


def model_processor(model: Any, spec: str | Path) -> Any:
    """The processor of a loaded vision-language model (None for a text-only one): the one saved with it (a
    run directory holds it), else its base model's (a LoRA run, a checkpoint)."""
    from sftlab.model.vision import is_vision_model, load_processor

    if not is_vision_model(model):
        return None
    for source in (Path(spec), *_base_sources(spec)):
        processor = load_processor(ModelConfig(name_or_path=str(source)), str(source))
        if processor is not None:
            return processor
    raise ConfigError(f"{spec} is a vision-language model, and no processor was found for it")


def _base_sources(spec: str | Path) -> list[str]:
    """Where a LoRA run's or a checkpoint's processor may be: its recorded base model."""
    path = Path(spec)
    if adapters.is_adapter_dir(path):
        return [resolve_model_path(adapters.base_config(path))]
    cfg = run_config(path)
    return [resolve_model_path(cfg.model)] if cfg is not None else []
