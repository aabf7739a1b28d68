"""AdamW with decoupled weight decay (none on biases and norms) and the LR schedule with warmup.

A model with bf16/fp16 parameters gets `MasterWeightAdamW` (train/precision.py): the same AdamW on
fp32 master copies, so updates smaller than a bf16 ulp are not lost. The fused AdamW kernel is used on
CPU and CUDA (measured ~3x faster than the default foreach implementation for the step on a 2-core CPU).
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from sftlab.config import OptimConfig
from sftlab.train.precision import MasterWeightAdamW, needs_master_weights


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # DeepSpeed drops empty groups
    kwargs = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
    if all(p.device.type in ("cpu", "cuda") for p in decay + no_decay):
        kwargs["fused"] = True  # one kernel for all parameters: ~3x faster than foreach on this CPU
    if needs_master_weights(model):
        return MasterWeightAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
