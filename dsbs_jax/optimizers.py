"""Optimizers and learning-rate schedules: the paper's AdamW and T5X's Adafactor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax.numpy as jnp
import optax

from dsbs_jax.errors import ConfigError

Schedule = Callable[[Any], Any]  # step -> learning rate, traced inside the train step


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and its schedule (kept for logging the learning rate)."""

  tx: optax.GradientTransformation
  learning_rate_fn: Schedule


def schedule(
    name: str, learning_rate: float, warmup_steps: int = 0, total_steps: Optional[int] = None
) -> Schedule:
  """`constant`, `linear` (HF Trainer's default: warmup then linear decay to 0
  at `total_steps`) or `rsqrt` (T5X: lr / sqrt(max(step, warmup)))."""
  if name == 'constant':
    fn = optax.constant_schedule(learning_rate)
  elif name == 'linear':
    if not total_steps:
      raise ConfigError('schedule "linear" needs total_steps (TRAIN_STEPS)')
    fn = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
  elif name == 'rsqrt':
    return lambda step: learning_rate / jnp.sqrt(jnp.maximum(step, max(warmup_steps, 1)))
  else:
    raise ConfigError(f'unknown learning-rate schedule {name!r}: constant, linear or rsqrt')
  if warmup_steps:
    fn = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), fn], [warmup_steps]
    )
  return fn


def create_optimizer(
    name: str = 'adamw',
    learning_rate: float = 5e-5,
    schedule_name: str = 'constant',
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    weight_decay: float = 0.0,
    clip_grad_norm: Optional[float] = None,
) -> Optimizer:
  """`adamw` (the paper: lr 5e-5) or `adafactor` (T5X's default), optionally
  clipping gradients by global norm first."""
  lr = schedule(schedule_name, learning_rate, warmup_steps, total_steps)
  if name == 'adamw':
    tx = optax.adamw(lr, weight_decay=weight_decay)
  elif name == 'adafactor':
    tx = optax.adafactor(lr, weight_decay_rate=weight_decay or None)
  else:
    raise ConfigError(f'unknown optimizer {name!r}: adamw or adafactor')
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return Optimizer(tx, lr)
