"""Loss functions and RL math for reward modelling, SFT, rejection sampling and PPO.

Everything here is a pure function of arrays: no I/O, no model, no configs. The jax functions
work under `jax.jit` with static shapes, and string options (`table`, `kind`) must be static.
Padding is always given by an explicit mask that is 1 (or True) on real positions and 0 on
padding. No function guesses padding from a token id, and masked reductions ignore padding even
when it contains NaN or inf.

Sources for the Llama 2 specifics: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned
Chat Models", arXiv:2307.09288. They are the preference levels and margin tables of the reward
model ranking loss (section 3.2.2, Table 27), the reward gating between the helpfulness and safety
models (section 3.2.3), and the best-of-N curves of rejection sampling (Figure 7). The KL
estimators k1, k2 and k3 are John Schulman's ("Approximating KL Divergence", 2020), and the
advantage estimator is GAE (Schulman et al. 2016, arXiv:1506.02438).

The best-of-N statistics (`expected_max_over_n`, `expected_median_over_n`) run on the host in
numpy because they need exact binomial coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# Preference levels that annotators give to the chosen response of a comparison.
SIGNIFICANTLY_BETTER = 0
BETTER = 1
SLIGHTLY_BETTER = 2
NEGLIGIBLY_BETTER = 3
UNKNOWN = 4
LEVEL_NAMES = (
    "significantly_better",
    "better",
    "slightly_better",
    "negligibly_better",
    "unknown",
)

# Ranking-loss margins for levels 0..3, from Llama 2 (Table 27). Level UNKNOWN always gets 0.
MARGIN_TABLES: Mapping[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}

KL_ESTIMATORS = ("k1", "k2", "k3")

# Llama 2 scores a response with the safety reward model when its calibrated safety score is
# below this value, whatever the prompt.
SAFETY_THRESHOLD = 0.15


def _check_same_shape(**arrays: ArrayLike) -> None:
    """Raises ValueError unless all named arrays have the same shape."""
    shapes = {name: tuple(jnp.shape(value)) for name, value in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Expected arrays of the same shape, got {listed}.")


def _check_rank(name: str, value: ArrayLike, rank: int, axes: str) -> None:
    """Raises ValueError unless `value` has `rank` dimensions, described by `axes`."""
    if jnp.ndim(value) != rank:
        raise ValueError(
            f"Expected {name} of shape {axes} ({rank} dimensions), got shape {jnp.shape(value)}."
        )


def _check_positive(name: str, value: float) -> None:
    """Raises ValueError when a concrete Python number is not positive."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"Expected {name} > 0, got {value}.")


def _as_bool(mask: ArrayLike) -> jax.Array:
    return jnp.asarray(mask).astype(bool)


# ---------------------------------------------------------------------------------------------
# Reward model: ranking loss with margin, pairwise accuracy.


def margins_for_levels(levels: ArrayLike, table: str) -> jax.Array:
    """Looks up the ranking-loss margin m(level) of each comparison.

    m = MARGIN_TABLES[table][level] for levels 0..3 and m = 0 for UNKNOWN (4).

    Args:
      levels: integer preference levels, any shape (usually [B]).
      table: a key of MARGIN_TABLES ("none", "small" or "large"); static under jit.

    Returns:
      float32 margins of the same shape as `levels`.

    Raises:
      ValueError: for an unknown table name, or for levels outside 0..4 when `levels` is a
        concrete array. Under jit, levels are not checked and an out-of-range level reads a
        margin of 0.
    """
    if table not in MARGIN_TABLES:
        raise ValueError(
            f"Unknown margin table {table!r}; expected one of {sorted(MARGIN_TABLES)}."
        )
    try:
        concrete_levels = np.asarray(levels)
    except jax.errors.TracerArrayConversionError:
        concrete_levels = None
    if concrete_levels is not None:
        if not np.issubdtype(concrete_levels.dtype, np.integer):
            raise ValueError(
                f"Expected integer preference levels, got dtype {concrete_levels.dtype}."
            )
        invalid = concrete_levels[(concrete_levels < 0) | (concrete_levels > UNKNOWN)]
        if invalid.size:
            raise ValueError(
                f"Invalid preference levels {sorted(set(invalid.tolist()))}; expected integers "
                f"0..{UNKNOWN} ({', '.join(LEVEL_NAMES)})."
            )

    levels = jnp.asarray(levels)
    lookup = jnp.asarray((*MARGIN_TABLES[table], 0.0), dtype=jnp.float32)
    in_range = (levels >= 0) & (levels <= UNKNOWN)
    return jnp.where(in_range, lookup[jnp.clip(levels, 0, UNKNOWN)], 0.0)


def ranking_loss(r_chosen: ArrayLike, r_rejected: ArrayLike, margin: ArrayLike = 0.0) -> jax.Array:
    """Computes the binary ranking loss with margin of a reward model, per comparison.

    L = -log σ(r_chosen - r_rejected - m) = softplus(-(r_chosen - r_rejected - m)),

    computed with softplus so that large score differences neither overflow nor lose precision.
    A larger margin requires a larger gap between the two scores, so it gives a larger loss.

    Args:
      r_chosen: scores of the chosen responses, [B].
      r_rejected: scores of the rejected responses, [B].
      margin: margins m, [B] or a scalar (see `margins_for_levels`).

    Returns:
      float32 loss per comparison, [B]. Callers take the mean.
    """
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    r_chosen = jnp.asarray(r_chosen, jnp.float32)
    r_rejected = jnp.asarray(r_rejected, jnp.float32)
    margin = jnp.asarray(margin, jnp.float32)
    return jax.nn.softplus(-(r_chosen - r_rejected - margin))


def pairwise_accuracy_by_level(
    r_chosen: ArrayLike, r_rejected: ArrayLike, levels: ArrayLike
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Counts correctly ranked comparisons per preference level and overall.

    A comparison is correct when r_chosen > r_rejected. A tie counts as incorrect, so a reward
    model that outputs a constant scores 0.

    Args:
      r_chosen: scores of the chosen responses, [B].
      r_rejected: scores of the rejected responses, [B].
      levels: integer preference levels 0..4, [B].

    Returns:
      A dict from each name in LEVEL_NAMES and "overall" to (correct_sum, count), both int32
      scalars, so that the host can add them up over batches before dividing.
    """
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected, levels=levels)
    correct = jnp.asarray(r_chosen) > jnp.asarray(r_rejected)
    levels = jnp.asarray(levels)

    counts = {}
    for level, name in enumerate(LEVEL_NAMES):
        in_level = levels == level
        counts[name] = (
            jnp.sum(correct & in_level, dtype=jnp.int32),
            jnp.sum(in_level, dtype=jnp.int32),
        )
    counts["overall"] = (jnp.sum(correct, dtype=jnp.int32), jnp.asarray(correct.size, jnp.int32))
    return counts


# ---------------------------------------------------------------------------------------------
# Masks and masked reductions.


def last_token_index(mask: ArrayLike) -> jax.Array:
    """Finds the index of the last real token of each row.

    index[b] = max{t : mask[b, t] = 1}. It works for left and right padding alike because it
    reads only the mask, so a pad id that equals EOS cannot move it.

    Args:
      mask: [B, T], 1 or True on real tokens.

    Returns:
      int32 indices, [B]. A row without any real token gets 0, so callers must not read a
      value there without checking the mask.
    """
    _check_rank("mask", mask, 2, "[B, T]")
    mask = _as_bool(mask)
    positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
    last = jnp.max(jnp.where(mask, positions[None, :], -1), axis=1)
    return jnp.maximum(last, 0)


def gather_at(values: ArrayLike, index: ArrayLike) -> jax.Array:
    """Picks values[b, index[b]] for each row b.

    Args:
      values: [B, T].
      index: integer positions, [B], each in 0..T-1.

    Returns:
      [B], of the dtype of `values`.
    """
    _check_rank("values", values, 2, "[B, T]")
    _check_rank("index", index, 1, "[B]")
    values = jnp.asarray(values)
    index = jnp.asarray(index)
    return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def masked_sum(
    x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Computes Σ x over real positions: Σ_i x_i [mask_i = 1].

    Padding is dropped with a select, not a product, so NaN or inf there does not leak in.
    `mask` must broadcast to the shape of `x`.
    """
    x = jnp.asarray(x)
    return jnp.sum(jnp.where(_as_bool(mask), x, jnp.zeros_like(x)), axis=axis)


def _mask_count(x: jax.Array, mask: ArrayLike, axis: int | tuple[int, ...] | None) -> jax.Array:
    mask = jnp.broadcast_to(_as_bool(mask), jnp.shape(x))
    return jnp.sum(mask, axis=axis, dtype=jnp.float32)


def masked_mean(
    x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Computes the mean over real positions: Σ x [mask = 1] / Σ [mask = 1].

    Where the mask has no real position, the mean is 0 instead of NaN, so that a batch row made
    only of padding cannot poison a loss.
    """
    x = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
    count = _mask_count(x, mask, axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(
    x: ArrayLike,
    mask: ArrayLike,
    unbiased: bool = True,
    axis: int | tuple[int, ...] | None = None,
) -> jax.Array:
    """Computes the variance over real positions.

    var = Σ (x - μ)² [mask = 1] / (n - 1) with n = Σ [mask = 1] and μ the masked mean, or
    divided by n when `unbiased` is False. When n <= 1 the unbiased variance is undefined and
    this returns the biased one (0 for one real position, 0 for none).
    """
    x = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
    count = _mask_count(x, mask, axis)
    keepdims_axis = axis if axis is not None else tuple(range(x.ndim))
    mean = jnp.expand_dims(masked_mean(x, mask, axis), keepdims_axis)
    sum_squares = masked_sum(jnp.square(x - mean), mask, axis)
    if unbiased:
        denominator = jnp.where(count > 1, count - 1.0, jnp.maximum(count, 1.0))
    else:
        denominator = jnp.maximum(count, 1.0)
    return sum_squares / denominator


def masked_whiten(
    x: ArrayLike, mask: ArrayLike, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Whitens x with the mean and variance of its real positions.

    whitened = (x - μ) / sqrt(σ² + eps), with μ the masked mean and σ² the unbiased masked
    variance over all real positions of the batch. When `shift_mean` is False the mean is added
    back, (x - μ) / sqrt(σ² + eps) + μ, which rescales the spread but keeps the mean. Padding
    positions return 0.
    """
    x = jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
    mask = _as_bool(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


# ---------------------------------------------------------------------------------------------
# Token log-probabilities, entropy and the SFT loss.


def token_log_probs(logits: ArrayLike, targets: ArrayLike, temperature: float = 1.0) -> jax.Array:
    """Computes log π(target) under the softmax of logits / temperature, per position.

    log p[b, t] = z[b, t, targets[b, t]] - logsumexp_v z[b, t, v], z = logits / temperature.

    No shifting happens here: logits[:, t] scores targets[:, t], so a caller that wants
    next-token log-probabilities passes logits[:, :-1] and tokens[:, 1:]. The math runs in
    float32 whatever the dtype of the logits.

    Args:
      logits: [B, T, V].
      targets: integer token ids, [B, T].
      temperature: softmax temperature > 0, the one that sampling used.

    Returns:
      float32 log-probabilities, [B, T].
    """
    _check_rank("logits", logits, 3, "[B, T, V]")
    if jnp.shape(logits)[:2] != jnp.shape(targets):
        raise ValueError(
            f"Expected targets of shape [B, T] = {jnp.shape(logits)[:2]} to match logits "
            f"[B, T, V] = {jnp.shape(logits)}, got {jnp.shape(targets)}."
        )
    _check_positive("temperature", temperature)
    scaled = jnp.asarray(logits, jnp.float32) / temperature

    # [B, T, V] -> [B, T]
    target_logits = jnp.take_along_axis(scaled, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(scaled, axis=-1)


def entropy_from_logits(logits: ArrayLike, temperature: float = 1.0) -> jax.Array:
    """Computes the entropy of the softmax of logits / temperature over the last axis.

    H = -Σ_v p_v log p_v = logsumexp(z) - Σ_v p_v z_v, with z = logits / temperature and
    p = softmax(z), in float32. Logits of -inf (tokens removed by top-k or top-p filtering)
    contribute 0, not NaN.

    Returns:
      The entropy in nats, of shape logits.shape[:-1].
    """
    _check_positive("temperature", temperature)
    scaled = jnp.asarray(logits, jnp.float32) / temperature
    probs = jax.nn.softmax(scaled, axis=-1)
    weighted = jnp.where(probs > 0, probs * scaled, 0.0)
    return jax.nn.logsumexp(scaled, axis=-1) - jnp.sum(weighted, axis=-1)


def sft_loss(
    logits: ArrayLike, tokens: ArrayLike, loss_mask: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Computes the next-token cross-entropy over the target tokens of a batch.

    loss = -Σ_{b, t ≥ 1} loss_mask[b, t] log softmax(logits[b, t - 1])[tokens[b, t]]
           / Σ_{b, t ≥ 1} loss_mask[b, t].

    logits[:, t] predicts tokens[:, t + 1]. `loss_mask` is aligned with `tokens`, so
    loss_mask[b, t] = 1 means tokens[b, t] is a target (an answer token, not a prompt token or
    padding). Nothing predicts tokens[:, 0], so loss_mask[:, 0] is ignored. The mean is over
    target tokens of the whole batch, not per row first.

    Args:
      logits: [B, T, V].
      tokens: integer token ids, [B, T].
      loss_mask: [B, T], 1 or True on target tokens.

    Returns:
      (loss, count): the float32 mean loss, 0 when the batch has no target token, and the
      float32 number of target tokens, so that the host can weight batches by count.
    """
    _check_rank("tokens", tokens, 2, "[B, T]")
    _check_same_shape(tokens=tokens, loss_mask=loss_mask)
    tokens = jnp.asarray(tokens)
    target_mask = _as_bool(loss_mask)[:, 1:]

    # [B, T - 1]: the log-probability of each next token.
    logp = token_log_probs(jnp.asarray(logits)[:, :-1], tokens[:, 1:])
    count = jnp.sum(target_mask, dtype=jnp.float32)
    loss = -masked_sum(logp, target_mask) / jnp.maximum(count, 1.0)
    return loss, count


# ---------------------------------------------------------------------------------------------
# KL estimators and the Llama 2 reward.


def kl_estimate(logp: ArrayLike, ref_logp: ArrayLike, kind: str) -> jax.Array:
    """Estimates KL(π ‖ π_ref) per token from log-probabilities of tokens sampled from π.

    With log r = ref_logp - logp (Schulman's estimators):
      k1 = logp - ref_logp = -log r    (unbiased, high variance, can be negative)
      k2 = ½ (logp - ref_logp)²        (biased, never negative)
      k3 = (r - 1) - log r             (unbiased, never negative, usually lower variance than k1)

    k3 is computed as expm1(log r) - log r to keep precision when π and π_ref are close.

    Args:
      logp: log π of the sampled tokens, any shape.
      ref_logp: log π_ref of the same tokens, same shape.
      kind: "k1", "k2" or "k3"; static under jit.

    Returns:
      float32 per-token estimates, same shape as the inputs.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}.")
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(log_ratio) - log_ratio


def gate_rewards(
    helpfulness: ArrayLike,
    safety: ArrayLike,
    is_safety_prompt: ArrayLike,
    threshold: float = SAFETY_THRESHOLD,
) -> tuple[jax.Array, jax.Array]:
    """Chooses between the helpfulness and safety reward of each response, as Llama 2 does.

    R_c = R_s if is_safety_prompt or R_s < threshold, else R_h.

    Both scores are sigmoid-calibrated, in (0, 1). The comparison is strict, so a safety score
    equal to the threshold keeps the helpfulness reward.

    Args:
      helpfulness: R_h, [B].
      safety: R_s, [B].
      is_safety_prompt: [B], True for prompts tagged as possibly unsafe.
      threshold: the safety score below which the safety reward is used (0.15 in Llama 2).

    Returns:
      (gated, used_safety): R_c as float32, [B], and a bool [B] that is True where R_c = R_s.
    """
    _check_same_shape(helpfulness=helpfulness, safety=safety, is_safety_prompt=is_safety_prompt)
    helpfulness = jnp.asarray(helpfulness, jnp.float32)
    safety = jnp.asarray(safety, jnp.float32)
    used_safety = _as_bool(is_safety_prompt) | (safety < threshold)
    return jnp.where(used_safety, safety, helpfulness), used_safety


_LOGIT_EPS = 1e-6


def logit(p: ArrayLike, eps: float = _LOGIT_EPS) -> jax.Array:
    """Computes log(p / (1 - p)) with p clipped to [eps, 1 - eps], so it stays finite.

    Above 0.5 the formula uses q = 1 - p, which is exact in floating point there, and clips q
    instead of p. Clipping p to the float32 value of 1 - eps would round and make the upper
    bound (13.80 for eps = 1e-6) differ from the lower one (-13.82).
    """
    p = jnp.asarray(p, jnp.float32)
    low = jnp.clip(p, eps, 0.5)
    high_complement = jnp.clip(1.0 - p, eps, 0.5)
    return jnp.where(
        p <= 0.5,
        jnp.log(low) - jnp.log1p(-low),
        jnp.log1p(-high_complement) - jnp.log(high_complement),
    )


def whiten(x: ArrayLike, mean: ArrayLike, std: ArrayLike, eps: float = 1e-8) -> jax.Array:
    """Standardizes x with given statistics: (x - mean) / (std + eps)."""
    return (jnp.asarray(x, jnp.float32) - mean) / (jnp.asarray(std, jnp.float32) + eps)


def llama2_reward(
    helpfulness_raw: ArrayLike,
    safety_raw: ArrayLike,
    is_safety_prompt: ArrayLike,
    mean: ArrayLike,
    std: ArrayLike,
    threshold: float = SAFETY_THRESHOLD,
) -> tuple[jax.Array, jax.Array]:
    """Computes the Llama 2 PPO reward R̃_c of each response from its two reward-model scores.

    The pipeline is
      1. R_h = σ(helpfulness_raw), R_s = σ(safety_raw): calibrate the raw outputs to (0, 1).
      2. R_c = gate_rewards(R_h, R_s, is_safety_prompt, threshold).
      3. R̃_c = whiten(logit(R_c), mean, std): undo the sigmoid, then standardize.

    Llama 2 then optimizes R̃_c - β KL(π ‖ π_0), where the KL term is added per token by
    `token_rewards`. Step 3 uses logit(clip(σ(x), ε, 1 - ε)) = clip(x, -L, L) with
    L = log((1 - ε) / ε) and ε = 1e-6 (L = 13.8155). It computes the right-hand side, which is
    the same number without the float32 rounding of σ(x) near 1.

    Args:
      helpfulness_raw: helpfulness reward-model outputs (before the sigmoid), [B].
      safety_raw: safety reward-model outputs (before the sigmoid), [B].
      is_safety_prompt: [B], True for prompts tagged as possibly unsafe.
      mean: mean of logit(R_c), for example a running or stored statistic over rollouts.
      std: standard deviation of logit(R_c), from the same statistics.
      threshold: safety score below which the safety reward is used.

    Returns:
      (reward, used_safety): R̃_c as float32, [B], and where the safety reward was used, [B].
    """
    helpfulness_raw = jnp.asarray(helpfulness_raw, jnp.float32)
    safety_raw = jnp.asarray(safety_raw, jnp.float32)
    _, used_safety = gate_rewards(
        jax.nn.sigmoid(helpfulness_raw), jax.nn.sigmoid(safety_raw), is_safety_prompt, threshold
    )

    # logit(clip(σ(x), ε, 1 - ε)) without leaving logit space.
    bound = math.log((1.0 - _LOGIT_EPS) / _LOGIT_EPS)
    gated_logit = jnp.clip(jnp.where(used_safety, safety_raw, helpfulness_raw), -bound, bound)
    return whiten(gated_logit, mean, std), used_safety


# ---------------------------------------------------------------------------------------------
# PPO: per-token rewards, GAE, clipped policy and value losses.


def token_rewards(
    score: ArrayLike, kl: ArrayLike, response_mask: ArrayLike, beta: float
) -> jax.Array:
    """Spreads a sequence score and a per-token KL penalty over the response tokens.

    r[b, t] = -β kl[b, t] on real response tokens, plus score[b] at the last real response
    token (its EOS, or the final token of a truncated response), and 0 on padding.

    Args:
      score: the sequence-level reward of each response, [B].
      kl: per-token KL estimates (see `kl_estimate`), [B, T].
      response_mask: [B, T], 1 or True on the response tokens that the policy generated.
      beta: KL penalty coefficient β.

    Returns:
      float32 rewards, [B, T]. A row without response tokens is all 0.
    """
    _check_rank("kl", kl, 2, "[B, T]")
    _check_rank("score", score, 1, "[B]")
    _check_same_shape(kl=kl, response_mask=response_mask)
    mask = _as_bool(response_mask)
    kl_penalty = jnp.where(mask, -beta * jnp.asarray(kl, jnp.float32), 0.0)

    # [B, T]: 1 at the last real response token, 0 elsewhere.
    is_last = jax.nn.one_hot(last_token_index(mask), mask.shape[1], dtype=jnp.bool_) & mask
    score = jnp.asarray(score, jnp.float32)[:, None]
    return kl_penalty + jnp.where(is_last, score, 0.0)


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    mask: ArrayLike,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Computes generalized advantage estimates and returns over the real tokens of each row.

    Over the real tokens t_1 < ... < t_n of a row (padding removed),
      δ_k = r_k + γ V_{k+1} - V_k,   with V_{n+1} = 0 (the episode ends at the last real token)
      A_k = δ_k + γ λ A_{k+1},       with A_{n+1} = 0
      R_k = A_k + V_k.
    A reverse `jax.lax.scan` carries (V, A) of the next real token across padding, so padding
    between real tokens is skipped rather than treated as an episode end. Padding positions get
    A = R = 0. Gradients flow through `values`; callers pass the rollout's value estimates.

    Args:
      rewards: per-token rewards, [B, T] (see `token_rewards`).
      values: value estimates V, [B, T].
      mask: [B, T], 1 or True on real (response) tokens.
      gamma: discount γ.
      lam: GAE parameter λ.

    Returns:
      (advantages, returns), both float32 [B, T].
    """
    _check_rank("rewards", rewards, 2, "[B, T]")
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    mask = _as_bool(mask)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_real = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (
            jnp.where(is_real, value, next_value),
            jnp.where(is_real, advantage, next_advantage),
        )
        return carry, jnp.where(is_real, advantage, 0.0)

    # Scan over time: [B, T] -> [T, B].
    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(
    logp: ArrayLike,
    old_logp: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Computes the PPO clipped surrogate loss, averaged over real tokens.

    ρ = exp(logp - old_logp),  L = mean_t -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A).

    Gradients flow only through `logp`: `old_logp` and `advantages` are treated as constants.

    Args:
      logp: log π_θ of the sampled tokens under the current policy, [B, T].
      old_logp: log π_old of the same tokens at rollout time, [B, T].
      advantages: A, [B, T].
      mask: [B, T], 1 or True on real response tokens.
      clip_eps: ε.

    Returns:
      (loss, metrics). The metrics are scalar means over real tokens: `clip_fraction`, the
      fraction of tokens where the clipped term is the larger loss (so its gradient is 0),
      `approx_kl`, the k3 estimate of KL(π_old ‖ π_θ) = mean (ρ - 1) - log ρ, and
      `ratio_mean`, the mean of ρ.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))

    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    unclipped_loss = -ratio * advantages
    clipped_loss = -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = masked_mean(jnp.maximum(unclipped_loss, clipped_loss), mask)

    metrics = {
        "clip_fraction": masked_mean(clipped_loss > unclipped_loss, mask),
        "approx_kl": masked_mean(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    clip: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Computes the clipped value loss of PPO, averaged over real tokens.

    V_clip = old_V + clip(V - old_V, -c, c),  L = mean_t ½ max((V - R)², (V_clip - R)²).

    Gradients flow only through `values`.

    Args:
      values: V from the current value head, [B, T].
      old_values: V at rollout time, [B, T].
      returns: targets R (see `gae`), [B, T].
      mask: [B, T], 1 or True on real response tokens.
      clip: c, the largest change of V from old_V that lowers the loss.

    Returns:
      (loss, metrics): `clip_fraction` is the fraction of real tokens where the clipped error
      is the larger one.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    values = jnp.asarray(values, jnp.float32)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    returns = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))

    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clip_fraction": masked_mean(clipped_error > unclipped_error, mask)}


def explained_variance(values: ArrayLike, returns: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Computes 1 - Var[R - V] / Var[R] over real tokens.

    1 means the value head predicts the returns exactly, 0 means it does no better than their
    mean, and a negative value means worse. When Var[R] = 0 the ratio is undefined and this
    returns 0.
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    values = jnp.asarray(values, jnp.float32)
    returns = jnp.asarray(returns, jnp.float32)
    returns_var = masked_var(returns, mask, unbiased=False)
    residual_var = masked_var(returns - values, mask, unbiased=False)
    safe_var = jnp.where(returns_var > 0, returns_var, 1.0)
    return jnp.where(returns_var > 0, 1.0 - residual_var / safe_var, 0.0)


# ---------------------------------------------------------------------------------------------
# Best-of-N statistics for rejection sampling (host-side numpy).


def _check_reward_matrix(rewards: ArrayLike) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] == 0:
        raise ValueError(
            "Expected rewards of shape [prompts, samples] with at least one sample, got shape "
            f"{rewards.shape}; reshape a single prompt's rewards with rewards[None, :]."
        )
    if not np.all(np.isfinite(rewards)):
        raise ValueError("Expected finite rewards, got NaN or inf.")
    return rewards


def _order_statistic_weights(num_samples: int, subset_size: int, rank: int) -> np.ndarray:
    """Returns P(the rank-th smallest of a random subset is the i-th smallest sample), i = 1..K.

    For a uniformly random subset of size N out of K samples sorted ascending,
    P = C(i - 1, rank - 1) C(K - i, N - rank) / C(K, N). Exact integers are divided last, so
    each probability is correctly rounded.
    """
    total = math.comb(num_samples, subset_size)
    return np.array(
        [
            math.comb(i - 1, rank - 1) * math.comb(num_samples - i, subset_size - rank) / total
            for i in range(1, num_samples + 1)
        ]
    )


def expected_max_over_n(rewards: ArrayLike) -> np.ndarray:
    """Computes the expected best reward among N samples, for N = 1..K (Llama 2, Figure 7).

    For each prompt with K sampled rewards sorted ascending r_(1) <= ... <= r_(K), the maximum
    over a uniformly random subset of N samples has expectation
      E[max] = Σ_i r_(i) C(i - 1, N - 1) / C(K, N),
    because r_(i) is the maximum exactly when it is in the subset and the other N - 1 come from
    the i - 1 smaller ones. The result is exact, ties included, and averaged over prompts.
    The cost is O(K²) binomial coefficients, quick for K in the hundreds.

    Args:
      rewards: [P, K], the rewards of K samples for each of P prompts.

    Returns:
      float64 [K]; entry N - 1 is the expected maximum over N samples.
    """
    rewards = _check_reward_matrix(rewards)
    num_samples = rewards.shape[1]
    sorted_means = np.sort(rewards, axis=1).mean(axis=0)
    return np.array(
        [
            _order_statistic_weights(num_samples, n, rank=n) @ sorted_means
            for n in range(1, num_samples + 1)
        ]
    )


def expected_median_over_n(rewards: ArrayLike) -> np.ndarray:
    """Computes the expected median reward among N samples, for N = 1..K (Llama 2, Figure 7).

    The median of N values is their ((N + 1) / 2)-th smallest for odd N and the mean of the
    (N / 2)-th and (N / 2 + 1)-th smallest for even N. For a uniformly random N-subset of the K
    sorted rewards, the j-th smallest of the subset is r_(i) with probability
    C(i - 1, j - 1) C(K - i, N - j) / C(K, N). The expectation is therefore exact, with no
    sampling, and it is averaged over prompts.

    Args:
      rewards: [P, K], the rewards of K samples for each of P prompts.

    Returns:
      float64 [K]; entry N - 1 is the expected median over N samples.
    """
    rewards = _check_reward_matrix(rewards)
    num_samples = rewards.shape[1]
    sorted_means = np.sort(rewards, axis=1).mean(axis=0)
    medians = []
    for n in range(1, num_samples + 1):
        if n % 2:
            weights = _order_statistic_weights(num_samples, n, rank=(n + 1) // 2)
        else:
            weights = 0.5 * (
                _order_statistic_weights(num_samples, n, rank=n // 2)
                + _order_statistic_weights(num_samples, n, rank=n // 2 + 1)
            )
        medians.append(weights @ sorted_means)
    return np.array(medians)
