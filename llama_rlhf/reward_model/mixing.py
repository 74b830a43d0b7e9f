"""Training-data mixtures of the helpfulness and the safety reward model, and the held-out split.

Llama 2 (Touvron et al. 2023, section 3.2.2, "Data Composition") trains two reward models:
  - helpfulness: all helpfulness comparisons, plus an equal number sampled uniformly from the
    rest (safety comparisons and other data);
  - safety: all safety comparisons, mixed with helpfulness comparisons in a 90/10 proportion.
A comparison counts as safety data when its prompt was a safety prompt (`is_safety_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

KINDS = ("helpfulness", "safety")

ComparisonT = TypeVar("ComparisonT")


def _sample(items: list, count: int, rng: np.random.Generator) -> list:
    """Draws `count` items uniformly without replacement (all of them when there are fewer)."""
    count = min(count, len(items))
    picked = rng.choice(len(items), size=count, replace=False)
    return [items[i] for i in sorted(picked.tolist())]


def mix_for_kind(
    comparisons: Sequence[ComparisonT],
    kind: str,
    *,
    seed: int,
    other_per_own: float = 1.0,
    safety_fraction: float = 0.9,
) -> list[ComparisonT]:
    """Selects and shuffles the training mixture of one reward model.

    With H helpfulness and S safety comparisons in `comparisons`:
      helpfulness: all H, plus min(S, round(other_per_own * H)) safety comparisons drawn
        uniformly without replacement;
      safety: all S, plus min(H, round(S * (1 - safety_fraction) / safety_fraction))
        helpfulness comparisons drawn the same way (S / 9 for the 90/10 mix).
    When the other side has too few comparisons, all of them are used, so the mixture then
    leans further towards the model's own data than the target proportion.

    Args:
      comparisons: objects with a boolean `is_safety_prompt` attribute (`Comparison`s).
      kind: "helpfulness" or "safety".
      seed: seed of the draw and of the final shuffle; the same seed gives the same list.
      other_per_own: for the helpfulness model, drawn safety comparisons per helpfulness
        comparison (1.0 in Llama 2).
      safety_fraction: for the safety model, the share of safety comparisons in the mixture
        (0.9 in Llama 2), in (0, 1].

    Returns:
      The mixture in a seeded random order.

    Raises:
      ValueError: for an unknown kind, a bad proportion, or no comparison of the model's own
        kind.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown reward model kind {kind!r}; expected one of {KINDS}.")
    if other_per_own < 0:
        raise ValueError(f"other_per_own must be >= 0, got {other_per_own}.")
    if not 0.0 < safety_fraction <= 1.0:
        raise ValueError(f"safety_fraction must be in (0, 1], got {safety_fraction}.")

    safety = [c for c in comparisons if c.is_safety_prompt]
    helpfulness = [c for c in comparisons if not c.is_safety_prompt]
    own, other = (helpfulness, safety) if kind == "helpfulness" else (safety, helpfulness)
    if not own:
        raise ValueError(
            f"No {kind} comparisons among {len(comparisons)} to train a {kind} reward model "
            f"(a comparison is safety data when is_safety_prompt is True)."
        )
    if kind == "helpfulness":
        wanted = round(other_per_own * len(own))
    else:
        wanted = round(len(own) * (1.0 - safety_fraction) / safety_fraction)

    rng = np.random.default_rng(seed)
    mixture = own + _sample(other, wanted, rng)
    order = rng.permutation(len(mixture))
    return [mixture[i] for i in order.tolist()]


def split_held_out(
    comparisons: Sequence[ComparisonT], eval_fraction: float, *, seed: int
) -> tuple[list[ComparisonT], list[ComparisonT]]:
    """Splits comparisons at random into a training and a held-out part.

    The held-out part has round(eval_fraction * N) comparisons, at least one when
    eval_fraction > 0 and N >= 2; both parts keep the input order.

    Returns:
      (train, held_out).

    Raises:
      ValueError: when eval_fraction is outside [0, 1) or the split leaves no training pair.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    num = len(comparisons)
    num_eval = round(eval_fraction * num)
    if eval_fraction > 0 and num >= 2:
        num_eval = max(num_eval, 1)
    if num - num_eval < 1:
        raise ValueError(
            f"Splitting {num} comparisons with eval_fraction {eval_fraction} leaves no training "
            "comparison."
        )
    held_out = np.zeros(num, bool)
    held_out[np.random.default_rng(seed).permutation(num)[:num_eval]] = True
    train = [c for c, is_held in zip(comparisons, held_out, strict=True) if not is_held]
    evaluation = [c for c, is_held in zip(comparisons, held_out, strict=True) if is_held]
    return train, evaluation
