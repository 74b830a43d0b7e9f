"""AdamW with the Llama 2 settings, its learning-rate schedules and the weight-decay mask.

Llama 2 (Touvron et al. 2023, sections 2.2 and 3.1) trains with AdamW, β1 = 0.9, β2 = 0.95,
eps = 1e-5, weight decay 0.1 and gradient clipping at a global norm of 1.0, under a cosine
schedule with linear warm-up that ends at 10% of the peak learning rate. Those are the defaults
of `default_optimizer_config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "constant")

# Parameters whose name ends with one of these are not decayed: RMSNorm scales (`.../scale`)
# and biases (`score_bias`). Every matrix and the embedding are decayed.
NO_DECAY_SUFFIXES = ("scale", "bias")


def default_optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Returns the optimizer settings with the Llama 2 defaults, updated by `overrides`.

    Fields:
      learning_rate: the peak learning rate.
      schedule: "cosine" (warm-up, then cosine decay to final_lr_fraction * peak at the last
        step) or "constant" (warm-up, then the peak until the end).
      warmup_fraction: the fraction of all steps spent warming up linearly from 0.
      min_warmup_steps: the minimum number of warm-up steps.
      final_lr_fraction: the cosine schedule's last learning rate as a fraction of the peak.
      b1, b2, eps: Adam's moment decay rates and denominator epsilon.
      weight_decay: decoupled weight decay, scaled by the learning rate as in AdamW.
      grad_clip: the maximum global gradient norm; 0 turns clipping off.

    Raises:
      KeyError: an override names a field that does not exist.
    """
    config = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "schedule": "cosine",
            "warmup_fraction": 0.03,
            "min_warmup_steps": 5,
            "final_lr_fraction": 0.1,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-5,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
        }
    )
    unknown = sorted(set(overrides) - set(config.keys()))
    if unknown:
        raise KeyError(
            f"Unknown optimizer config fields {unknown}; valid fields: {sorted(config.keys())}."
        )
    config.update(overrides)
    return config


def warmup_steps(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
    """Returns the number of warm-up steps: max(min_warmup_steps, ceil(warmup_fraction * total))."""
    return max(int(opt_cfg.min_warmup_steps), math.ceil(opt_cfg.warmup_fraction * total_steps))


def make_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Builds the learning-rate schedule lr(step) for steps 0 .. total_steps - 1.

    With W warm-up steps, peak η and final fraction f:
      lr(s) = η s / W                                              for s < W,
      cosine: lr(s) = η (f + (1 - f) (1 + cos(π (s - W) / (N - W))) / 2)   for W ≤ s ≤ N,
      constant: lr(s) = η                                          for s ≥ W,
    where N = max(total_steps, W + 1), so the cosine reaches f η at the last step only when
    the run is longer than its warm-up. Step 0 has learning rate 0.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if opt_cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"Optimizer schedule must be one of {SCHEDULES}, got {opt_cfg.schedule!r}."
        )
    peak = float(opt_cfg.learning_rate)
    if peak < 0:
        raise ValueError(f"Optimizer learning_rate must be non-negative, got {peak}.")
    warmup = warmup_steps(opt_cfg, total_steps)
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=peak * float(opt_cfg.final_lr_fraction),
        )
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )


def _key_name(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def decay_mask(params) -> Any:
    """Returns a tree of bools over `params`: True where weight decay applies.

    The decision is by parameter path: a parameter whose dictionary key ends with "scale"
    (RMSNorm) or "bias" is not decayed. Flax metadata boxes (`nn.Partitioned`) are looked
    through, so the mask also works on boxed parameters.
    """

    def decide(path, _) -> bool:
        names = [_key_name(entry) for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return not (names and names[-1].endswith(NO_DECAY_SUFFIXES))

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(
    opt_cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """Builds AdamW with global-norm clipping and the configured schedule.

    The update is clip_by_global_norm(grad_clip), then AdamW (b1, b2, eps) with decoupled
    weight decay on the parameters selected by `decay_mask`: norm scales and biases are not
    decayed.

    Returns:
      (tx, schedule): the optax transformation and lr(step), for logging.
    """
    schedule = make_schedule(opt_cfg, total_steps)
    for name in ("b1", "b2"):
        if not 0.0 <= float(opt_cfg[name]) < 1.0:
            raise ValueError(f"Optimizer {name} must be in [0, 1), got {opt_cfg[name]}.")
    if float(opt_cfg.grad_clip) < 0:
        raise ValueError(f"Optimizer grad_clip must be >= 0, got {opt_cfg.grad_clip}.")
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=float(opt_cfg.b1),
        b2=float(opt_cfg.b2),
        eps=float(opt_cfg.eps),
        weight_decay=float(opt_cfg.weight_decay),
        mask=decay_mask,
    )
    if float(opt_cfg.grad_clip) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(opt_cfg.grad_clip)), adamw)
    else:
        tx = adamw
    return tx, schedule
