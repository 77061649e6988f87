"""Optimizer and an iteration-based LR schedule (warmup × multistep or cosine).

Stepping the schedule every iteration keeps its whole state in one counter, so a resume in
the middle of an epoch continues the exact same learning-rate curve.
"""
from __future__ import annotations

import math

import torch

from engine.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.opt == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(iteration: int, config: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of the base LR at global ``iteration`` (0-based)."""
    warmup = 1.0
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        warmup = config.warmup_factor * (1 - alpha) + alpha
    if config.lr_scheduler == "cosine":
        total = max(config.epochs * iters_per_epoch, 1)
        return warmup * 0.5 * (1 + math.cos(math.pi * min(iteration, total) / total))
    passed = sum(1 for step in config.lr_steps if iteration >= step * iters_per_epoch)
    return warmup * config.lr_gamma ** passed


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                       iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, config, iters_per_epoch))
