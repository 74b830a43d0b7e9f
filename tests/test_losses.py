"""Tests of llama_rlhf.losses.

Unless a test states otherwise, its expected values come from the plain numpy for-loops defined
in this file (the `reference_*` functions), which walk over every row and token one at a time
and share no code with the jax implementation. Hand-computed numbers state their arithmetic in
a comment.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from llama_rlhf import losses

# Masks of shape [4, 7] covering the padding layouts the library meets. "mixed" has one row of
# each kind, plus a row with a hole (real tokens on both sides of padding) and an empty row.
MASKS = {
    "right_padding": np.array(
        [
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0, 0],
        ]
    ),
    "left_padding": np.array(
        [
            [0, 0, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 1, 1],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1],
        ]
    ),
    "all_real": np.ones((4, 7), dtype=np.int64),
    "single_token": np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 1],
            [0, 0, 0, 1, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0],
        ]
    ),
    "mixed": np.array(
        [
            [0, 0, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    ),
}
NONEMPTY_MASKS = {name: mask for name, mask in MASKS.items() if name != "mixed"}


def random_normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Plain numpy references, one element at a time.


def reference_last_index(mask):
    indices = []
    for row in mask:
        last = 0
        for t, is_real in enumerate(row):
            if is_real:
                last = t
        indices.append(last)
    return np.array(indices)


def reference_log_prob(logits_row, target, temperature):
    scaled = [float(v) / temperature for v in logits_row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return scaled[target] - log_norm


def reference_masked_values(x, mask):
    return [float(v) for v, m in zip(np.ravel(x), np.ravel(mask), strict=True) if m]


def reference_mean(values):
    return sum(values) / len(values) if values else 0.0


def reference_var(values, unbiased):
    n = len(values)
    if n == 0:
        return 0.0
    mean = reference_mean(values)
    squares = sum((v - mean) ** 2 for v in values)
    return squares / (n - 1) if unbiased and n > 1 else squares / n


def reference_gae(rewards, values, mask, gamma, lam):
    advantages = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value = 0.0
        next_advantage = 0.0
        for t in reversed(real):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t] = next_advantage
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def reference_token_rewards(score, kl, mask, beta):
    rewards = np.zeros(kl.shape)
    for b in range(kl.shape[0]):
        real = [t for t in range(kl.shape[1]) if mask[b, t]]
        for t in real:
            rewards[b, t] = -beta * kl[b, t]
        if real:
            rewards[b, real[-1]] += score[b]
    return rewards


def reference_ppo(logp, old_logp, advantages, mask, clip_eps):
    losses_, clipped, kls = [], [], []
    for lp, olp, adv, m in zip(
        logp.ravel(), old_logp.ravel(), advantages.ravel(), mask.ravel(), strict=True
    ):
        if not m:
            continue
        ratio = math.exp(lp - olp)
        clipped_ratio = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
        unclipped_loss = -ratio * adv
        clipped_loss = -clipped_ratio * adv
        losses_.append(max(unclipped_loss, clipped_loss))
        clipped.append(float(clipped_loss > unclipped_loss))
        kls.append(ratio - 1 - math.log(ratio))
    return reference_mean(losses_), reference_mean(clipped), reference_mean(kls)


def reference_value_loss(values, old_values, returns, mask, clip):
    losses_, clipped = [], []
    for v, ov, r, m in zip(
        values.ravel(), old_values.ravel(), returns.ravel(), mask.ravel(), strict=True
    ):
        if not m:
            continue
        clipped_value = ov + min(max(v - ov, -clip), clip)
        unclipped_error = (v - r) ** 2
        clipped_error = (clipped_value - r) ** 2
        losses_.append(0.5 * max(unclipped_error, clipped_error))
        clipped.append(float(clipped_error > unclipped_error))
    return reference_mean(losses_), reference_mean(clipped)


def brute_force_best_of_n(rewards, statistic):
    """Averages `statistic` over every N-subset of every prompt's samples, for N = 1..K."""
    num_samples = rewards.shape[1]
    results = []
    for n in range(1, num_samples + 1):
        per_prompt = []
        for row in rewards:
            subsets = list(itertools.combinations(row.tolist(), n))
            per_prompt.append(sum(statistic(s) for s in subsets) / len(subsets))
        results.append(sum(per_prompt) / len(per_prompt))
    return np.array(results)


# ---------------------------------------------------------------------------------------------
# Reward model.


def test_margins_for_levels_tables():
    levels = np.array([0, 1, 2, 3, 4])
    # Expected: Llama 2, Table 27, with 0 for the unknown level.
    assert_allclose(losses.margins_for_levels(levels, "small"), [1, 2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    assert_allclose(losses.margins_for_levels(levels, "large"), [3, 2, 1, 0, 0])
    assert_allclose(losses.margins_for_levels(levels, "none"), [0, 0, 0, 0, 0])


def test_margins_for_levels_under_jit():
    lookup = jax.jit(losses.margins_for_levels, static_argnums=1)
    assert_allclose(lookup(jnp.array([[4, 0], [1, 3]]), "large"), [[0, 3], [2, 0]])
    # Under jit levels cannot be checked, so levels outside 0..4 read a margin of 0.
    assert_allclose(lookup(jnp.array([-3, -1, 5, 9]), "large"), [0, 0, 0, 0])


def test_margins_for_levels_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown margin table 'medium'"):
        losses.margins_for_levels(np.array([0]), "medium")
    with pytest.raises(ValueError, match=r"Invalid preference levels \[-1, 5\]"):
        losses.margins_for_levels(np.array([0, 5, -1]), "small")
    with pytest.raises(ValueError, match="integer preference levels"):
        losses.margins_for_levels(np.array([0.0, 1.0]), "small")


def test_ranking_loss_hand_values():
    chosen = jnp.array([1.0])
    rejected = jnp.array([0.0])
    # -log σ(1 - 0 - 1) = log 2; -log σ(1) = log(1 + e^-1).
    assert_allclose(losses.ranking_loss(chosen, rejected, 1.0), [math.log(2)], rtol=1e-6)
    assert_allclose(losses.ranking_loss(chosen, rejected), [math.log1p(math.exp(-1))], rtol=1e-6)
    assert_allclose(losses.ranking_loss(chosen, rejected, 1.0), [0.6931], atol=1e-4)
    assert_allclose(losses.ranking_loss(chosen, rejected), [0.3133], atol=1e-4)


def test_ranking_loss_grows_with_margin():
    chosen = jnp.full(4, 1.0)
    rejected = jnp.zeros(4)
    margins = losses.margins_for_levels(np.array([3, 2, 1, 0]), "large")
    per_example = np.asarray(losses.ranking_loss(chosen, rejected, margins))
    assert np.all(np.diff(per_example) > 0)


def test_ranking_loss_matches_loop():
    chosen = random_normal(0, 16) * 3
    rejected = random_normal(1, 16) * 3
    margin = np.abs(random_normal(2, 16))
    expected = [
        -math.log(sigmoid(c - r - m)) for c, r, m in zip(chosen, rejected, margin, strict=True)
    ]
    assert_allclose(losses.ranking_loss(chosen, rejected, margin), expected, rtol=1e-5)


def test_ranking_loss_stable_for_large_gaps():
    # softplus(-200) underflows to 0 and softplus(200) = 200 (up to 1e-87).
    loss = losses.ranking_loss(jnp.array([100.0, -100.0]), jnp.array([-100.0, 100.0]))
    assert_allclose(loss, [0.0, 200.0], atol=1e-6)


def test_ranking_loss_gradient_is_sigmoid():
    chosen = random_normal(3, 8)
    rejected = random_normal(4, 8)
    margin = np.abs(random_normal(5, 8))
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: jnp.sum(losses.ranking_loss(c, r, margin)), argnums=(0, 1)
    )(jnp.asarray(chosen), jnp.asarray(rejected))
    # d/dc -log σ(c - r - m) = σ(c - r - m) - 1, and the derivative in r is its negative.
    expected = [sigmoid(c - r - m) - 1 for c, r, m in zip(chosen, rejected, margin, strict=True)]
    assert_allclose(grad_chosen, expected, rtol=1e-5, atol=1e-7)
    assert_allclose(grad_rejected, -np.array(expected), rtol=1e-5, atol=1e-7)


def test_pairwise_accuracy_by_level_matches_loop():
    rng = np.random.default_rng(6)
    chosen = rng.normal(size=40).astype(np.float32)
    rejected = rng.normal(size=40).astype(np.float32)
    rejected[:5] = chosen[:5]  # ties
    levels = rng.integers(0, 5, size=40)
    counts = jax.jit(losses.pairwise_accuracy_by_level)(chosen, rejected, levels)

    assert set(counts) == {*losses.LEVEL_NAMES, "overall"}
    for level, name in enumerate(losses.LEVEL_NAMES):
        expected_correct = 0
        expected_count = 0
        for c, r, lv in zip(chosen, rejected, levels, strict=True):
            if lv == level:
                expected_count += 1
                expected_correct += int(c > r)
        assert int(counts[name][0]) == expected_correct, name
        assert int(counts[name][1]) == expected_count, name
    assert int(counts["overall"][0]) == sum(
        int(c > r) for c, r in zip(chosen, rejected, strict=True)
    )
    assert int(counts["overall"][1]) == 40


def test_pairwise_accuracy_counts_ties_as_wrong():
    counts = losses.pairwise_accuracy_by_level(
        jnp.array([0.5, 0.5, 1.0]), jnp.array([0.5, 0.7, 0.0]), jnp.array([1, 1, 1])
    )
    assert int(counts["better"][0]) == 1
    assert int(counts["better"][1]) == 3
    assert int(counts["unknown"][1]) == 0


# ---------------------------------------------------------------------------------------------
# Masks and reductions.


def test_last_token_index_pad_equals_eos():
    # Right padding whose pad id equals EOS (2): only the mask shows where the text ends.
    ids = np.array([[1, 7, 2, 1, 8, 9, 2, 2, 2]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert ids[0, 6] == 2
    assert int(losses.last_token_index(mask)[0]) == 6


def test_last_token_index_left_padding_is_end():
    index = losses.last_token_index(MASKS["left_padding"])
    assert_allclose(index, [6, 6, 6, 6])


@pytest.mark.parametrize("name", list(MASKS))
def test_last_token_index_matches_loop(name):
    mask = MASKS[name]
    assert_allclose(jax.jit(losses.last_token_index)(mask), reference_last_index(mask))


def test_last_token_index_empty_row_is_zero():
    assert int(losses.last_token_index(np.zeros((1, 5)))[0]) == 0


def test_gather_at_matches_loop():
    values = random_normal(7, (4, 7))
    index = np.array([0, 6, 3, 2])
    expected = [values[b, index[b]] for b in range(4)]
    assert_allclose(losses.gather_at(values, index), expected)


@pytest.mark.parametrize("name", list(MASKS))
def test_masked_reductions_match_loop(name):
    mask = MASKS[name]
    x = random_normal(8, mask.shape)
    x[mask == 0] = np.nan  # padding must not leak, even as NaN
    values = reference_masked_values(x, mask)

    assert_allclose(losses.masked_sum(x, mask), sum(values), rtol=1e-5, atol=1e-6)
    assert_allclose(losses.masked_mean(x, mask), reference_mean(values), rtol=1e-5, atol=1e-6)
    for unbiased in (True, False):
        assert_allclose(
            losses.masked_var(x, mask, unbiased=unbiased),
            reference_var(values, unbiased),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("name", list(MASKS))
def test_masked_reductions_per_row_match_loop(name):
    mask = MASKS[name]
    x = random_normal(9, mask.shape)
    rows = [reference_masked_values(x[b], mask[b]) for b in range(mask.shape[0])]

    assert_allclose(losses.masked_sum(x, mask, axis=1), [sum(r) for r in rows], atol=1e-5)
    assert_allclose(
        losses.masked_mean(x, mask, axis=1), [reference_mean(r) for r in rows], atol=1e-5
    )
    assert_allclose(
        losses.masked_var(x, mask, axis=1), [reference_var(r, True) for r in rows], atol=1e-5
    )


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(name, shift_mean):
    mask = MASKS[name]
    x = random_normal(10, mask.shape) * 5 + 2
    x[mask == 0] = np.inf
    values = reference_masked_values(x, mask)
    mean = reference_mean(values)
    scale = 1 / math.sqrt(reference_var(values, unbiased=True) + 1e-8)
    expected = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        if mask[b, t]:
            expected[b, t] = (x[b, t] - mean) * scale + (0.0 if shift_mean else mean)

    whitened = jax.jit(losses.masked_whiten, static_argnums=2)(x, mask, shift_mean)
    assert_allclose(whitened, expected, rtol=1e-4, atol=1e-4)


def test_masked_whiten_unit_statistics():
    mask = MASKS["mixed"]
    x = random_normal(11, mask.shape) * 3 - 4
    whitened = losses.masked_whiten(x, mask)
    assert_allclose(losses.masked_mean(whitened, mask), 0.0, atol=1e-5)
    assert_allclose(losses.masked_var(whitened, mask), 1.0, rtol=1e-4)
    assert np.all(np.asarray(whitened)[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------
# Log-probabilities, entropy, SFT loss.


def test_token_log_probs_hand_values():
    logits = jnp.array([[[2.0, 1.0, 0.0]]])
    target = jnp.array([[0]])
    # 2/0.7 - log(e^(2/0.7) + e^(1/0.7) + 1) = -0.2601184; 2 - log(e^2 + e + 1) = -0.4076060.
    assert_allclose(losses.token_log_probs(logits, target, 0.7), [[-0.2601184]], atol=1e-6)
    assert_allclose(losses.token_log_probs(logits, target), [[-0.4076060]], atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_log_probs_matches_loop(temperature):
    logits = random_normal(12, (3, 5, 11)) * 4
    targets = np.random.default_rng(13).integers(0, 11, size=(3, 5))
    expected = np.zeros((3, 5))
    for b, t in np.ndindex(3, 5):
        expected[b, t] = reference_log_prob(logits[b, t], targets[b, t], temperature)
    assert_allclose(losses.token_log_probs(logits, targets, temperature), expected, atol=1e-5)


def test_token_log_probs_bfloat16_logits_in_float32():
    logits = random_normal(14, (2, 3, 7))
    targets = np.zeros((2, 3), dtype=np.int32)
    logp = losses.token_log_probs(jnp.asarray(logits, jnp.bfloat16), targets)
    assert logp.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected = [[reference_log_prob(rounded[b, t], 0, 1.0) for t in range(3)] for b in range(2)]
    assert_allclose(logp, expected, atol=1e-5)


def test_token_log_probs_rejects_bad_input():
    with pytest.raises(ValueError, match="targets of shape"):
        losses.token_log_probs(np.zeros((2, 3, 5)), np.zeros((2, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="temperature > 0"):
        losses.token_log_probs(np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=np.int32), 0.0)
    with pytest.raises(ValueError, match=r"logits of shape \[B, T, V\]"):
        losses.token_log_probs(np.zeros((3, 5)), np.zeros((3,), dtype=np.int32))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_from_logits_matches_loop(temperature):
    logits = random_normal(15, (2, 3, 6)) * 3
    expected = np.zeros((2, 3))
    for b, t in np.ndindex(2, 3):
        logps = [reference_log_prob(logits[b, t], v, temperature) for v in range(6)]
        expected[b, t] = -sum(math.exp(lp) * lp for lp in logps)
    assert_allclose(losses.entropy_from_logits(logits, temperature), expected, atol=1e-5)


def test_entropy_of_uniform_is_log_vocab():
    assert_allclose(losses.entropy_from_logits(jnp.zeros((1, 10))), [math.log(10)], rtol=1e-6)


def test_entropy_ignores_filtered_tokens():
    # Two tokens left after filtering, equally likely: H = log 2.
    logits = jnp.array([[0.0, -jnp.inf, 0.0, -jnp.inf]])
    assert_allclose(losses.entropy_from_logits(logits), [math.log(2)], rtol=1e-6)


@pytest.mark.parametrize("name", list(MASKS))
def test_sft_loss_matches_loop(name):
    loss_mask = MASKS[name]
    logits = random_normal(16, (4, 7, 9)) * 2
    tokens = np.random.default_rng(17).integers(0, 9, size=(4, 7))
    terms = []
    for b in range(4):
        for t in range(1, 7):  # logits[b, t - 1] predicts tokens[b, t]
            if loss_mask[b, t]:
                terms.append(-reference_log_prob(logits[b, t - 1], tokens[b, t], 1.0))

    loss, count = jax.jit(losses.sft_loss)(logits, tokens, loss_mask)
    assert float(count) == len(terms)
    assert_allclose(loss, reference_mean(terms), rtol=1e-5, atol=1e-6)


def test_sft_loss_ignores_non_target_logits():
    loss_mask = MASKS["right_padding"]
    logits = random_normal(18, (4, 7, 9))
    tokens = np.random.default_rng(19).integers(0, 9, size=(4, 7))
    changed = logits.copy()
    # logits[b, t] only matters when tokens[b, t + 1] is a target.
    for b, t in np.ndindex(4, 6):
        if not loss_mask[b, t + 1]:
            changed[b, t] = 100.0 * random_normal(b * 7 + t, 9)
    changed[:, 6] = 1e4  # the last position predicts nothing
    assert_allclose(
        losses.sft_loss(changed, tokens, loss_mask)[0],
        losses.sft_loss(logits, tokens, loss_mask)[0],
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# KL estimators and the Llama 2 reward.


def test_kl_estimate_hand_values():
    logp = jnp.log(jnp.array([0.5]))
    ref_logp = jnp.log(jnp.array([0.25]))
    # log r = log(0.25 / 0.5) = -log 2.
    # k1 = log 2, k2 = ½ (log 2)², k3 = (0.5 - 1) + log 2.
    assert_allclose(losses.kl_estimate(logp, ref_logp, "k1"), [math.log(2)], rtol=1e-6)
    assert_allclose(losses.kl_estimate(logp, ref_logp, "k2"), [0.5 * math.log(2) ** 2], rtol=1e-6)
    assert_allclose(losses.kl_estimate(logp, ref_logp, "k3"), [math.log(2) - 0.5], rtol=1e-6)


def test_kl_estimate_matches_loop():
    logp = random_normal(20, (3, 5))
    ref_logp = random_normal(21, (3, 5))
    for kind, formula in [
        ("k1", lambda lp, rl: lp - rl),
        ("k2", lambda lp, rl: 0.5 * (lp - rl) ** 2),
        ("k3", lambda lp, rl: math.exp(rl - lp) - 1 - (rl - lp)),
    ]:
        expected = [
            [formula(lp, rl) for lp, rl in zip(a, b, strict=True)]
            for a, b in zip(logp, ref_logp, strict=True)
        ]
        assert_allclose(losses.kl_estimate(logp, ref_logp, kind), expected, rtol=1e-5, atol=1e-6)


def test_kl_estimators_k1_k3_unbiased():
    # Expected: the exact KL(p ‖ q) = Σ p log(p / q) of two categorical distributions. k1 and k3
    # averaged over samples from p must approach it; 200,000 samples give a standard error near
    # 1e-3 here.
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(p * np.log(p / q)))
    samples = np.random.default_rng(22).choice(4, size=200_000, p=p)
    logp = np.log(p)[samples].astype(np.float32)
    ref_logp = np.log(q)[samples].astype(np.float32)
    for kind in ("k1", "k3"):
        estimate = float(jnp.mean(losses.kl_estimate(logp, ref_logp, kind)))
        assert abs(estimate - exact) < 5e-3, kind


def test_kl_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Unknown KL estimator 'k4'"):
        losses.kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


def test_gate_rewards_threshold_is_strict():
    helpfulness = jnp.array([0.9, 0.9, 0.9, 0.9])
    safety = jnp.array([0.15, 0.1499, 0.9, 0.15])
    is_safety_prompt = jnp.array([False, False, True, True])
    gated, used_safety = losses.gate_rewards(helpfulness, safety, is_safety_prompt)
    # 0.15 is not below 0.15, so row 0 keeps helpfulness. Row 1 is below the threshold, and rows
    # 2 and 3 are safety prompts, which always take the safety score.
    assert_allclose(gated, [0.9, 0.1499, 0.9, 0.15], rtol=1e-6)
    assert np.asarray(used_safety).tolist() == [False, True, True, True]


def test_gate_rewards_matches_loop():
    rng = np.random.default_rng(23)
    helpfulness = rng.uniform(size=32).astype(np.float32)
    safety = rng.uniform(0, 0.4, size=32).astype(np.float32)
    is_safety_prompt = rng.uniform(size=32) < 0.3
    gated, used_safety = jax.jit(losses.gate_rewards)(helpfulness, safety, is_safety_prompt)
    for i in range(32):
        use = bool(is_safety_prompt[i]) or safety[i] < np.float32(0.15)
        assert bool(used_safety[i]) == use
        assert float(gated[i]) == float(safety[i] if use else helpfulness[i])


def test_logit_clips_and_inverts_sigmoid():
    p = jnp.array([0.0, 1.0, 0.5, 0.2])
    # Clipped ends: ±log((1 - 1e-6) / 1e-6) = ±13.815509.
    bound = math.log((1 - 1e-6) / 1e-6)
    assert_allclose(losses.logit(p), [-bound, bound, 0.0, math.log(0.25)], rtol=1e-6)
    x = random_normal(24, 16) * 3
    assert_allclose(losses.logit(jax.nn.sigmoid(x)), x, atol=1e-4)


def test_whiten_with_given_statistics():
    assert_allclose(losses.whiten(jnp.array([3.0, -1.0]), 1.0, 2.0), [1.0, -1.0], rtol=1e-6)


def test_llama2_reward_matches_loop():
    rng = np.random.default_rng(25)
    helpfulness_raw = rng.normal(size=32).astype(np.float32) * 2
    safety_raw = rng.normal(-1.0, 1.5, size=32).astype(np.float32)
    is_safety_prompt = rng.uniform(size=32) < 0.25
    mean, std = 0.3, 1.7

    reward, used_safety = jax.jit(losses.llama2_reward)(
        helpfulness_raw, safety_raw, is_safety_prompt, mean, std
    )
    assert np.any(used_safety)
    assert not np.all(used_safety)
    for i in range(32):
        helpfulness = sigmoid(float(helpfulness_raw[i]))
        safety = sigmoid(float(safety_raw[i]))
        use = bool(is_safety_prompt[i]) or safety < 0.15
        chosen = min(max(safety if use else helpfulness, 1e-6), 1 - 1e-6)
        expected = (math.log(chosen / (1 - chosen)) - mean) / (std + 1e-8)
        assert bool(used_safety[i]) == use
        assert_allclose(float(reward[i]), expected, rtol=1e-4, atol=1e-4)


def test_llama2_reward_equals_composition():
    # Expected: the documented pipeline spelled out with the public functions; raw scores stay
    # within ±8, where float32 σ keeps enough precision for the round trip.
    rng = np.random.default_rng(47)
    helpfulness_raw = rng.uniform(-8, 8, size=16).astype(np.float32)
    safety_raw = rng.uniform(-8, 8, size=16).astype(np.float32)
    is_safety_prompt = rng.uniform(size=16) < 0.3
    gated, used = losses.gate_rewards(
        jax.nn.sigmoid(helpfulness_raw), jax.nn.sigmoid(safety_raw), is_safety_prompt
    )
    expected = losses.whiten(losses.logit(gated), -0.5, 2.0)
    reward, used_safety = losses.llama2_reward(
        helpfulness_raw, safety_raw, is_safety_prompt, -0.5, 2.0
    )
    assert_allclose(reward, expected, rtol=1e-3, atol=1e-3)
    assert np.array_equal(used_safety, used)


def test_llama2_reward_clips_extreme_scores():
    reward, _ = losses.llama2_reward(
        jnp.array([40.0, -40.0]), jnp.array([5.0, 5.0]), jnp.array([False, False]), 0.0, 1.0
    )
    # Helpfulness is used (σ(5) > 0.15); its logit is clipped to ±log((1 - 1e-6) / 1e-6).
    bound = math.log((1 - 1e-6) / 1e-6)
    assert_allclose(reward, [bound, -bound], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# PPO.


def test_token_rewards_score_at_eos():
    # Response [t0, t1, EOS, PAD, PAD] with score 1 and no KL.
    rewards = losses.token_rewards(
        jnp.array([1.0]), jnp.zeros((1, 5)), jnp.array([[1, 1, 1, 0, 0]]), beta=0.1
    )
    assert_allclose(rewards, [[0, 0, 1, 0, 0]])


@pytest.mark.parametrize("name", list(MASKS))
def test_token_rewards_matches_loop(name):
    mask = MASKS[name]
    score = random_normal(26, 4)
    kl = random_normal(27, mask.shape)
    expected = reference_token_rewards(score, kl, mask, beta=0.05)
    kl[mask == 0] = np.nan
    assert_allclose(jax.jit(losses.token_rewards)(score, kl, mask, 0.05), expected, atol=1e-6)


def test_gae_hand_values():
    rewards = jnp.array([[0.0, 0.0, 1.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0, 0]])
    advantages, returns = losses.gae(rewards, jnp.zeros((1, 5)), mask, gamma=1.0, lam=0.95)
    # A_2 = 1, A_1 = 0.95 A_2, A_0 = 0.95 A_1; padding gets 0.
    assert_allclose(advantages, [[0.9025, 0.95, 1.0, 0.0, 0.0]], rtol=1e-6)
    assert_allclose(returns, [[0.9025, 0.95, 1.0, 0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop(name, gamma, lam):
    mask = MASKS[name]
    rewards = random_normal(28, mask.shape)
    values = random_normal(29, mask.shape)
    expected_advantages, expected_returns = reference_gae(rewards, values, mask, gamma, lam)
    # Values past the last real token must not be read.
    values[mask == 0] = 1e6
    rewards[mask == 0] = 1e6

    advantages, returns = jax.jit(losses.gae, static_argnums=(3, 4))(
        rewards, values, mask, gamma, lam
    )
    assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("clip_eps", [0.2, 0.1])
def test_ppo_policy_loss_matches_loop(name, clip_eps):
    mask = MASKS[name]
    old_logp = random_normal(30, mask.shape) - 2
    logp = old_logp + 0.3 * random_normal(31, mask.shape)
    advantages = random_normal(32, mask.shape)
    expected_loss, expected_clip, expected_kl = reference_ppo(
        logp, old_logp, advantages, mask, clip_eps
    )

    loss, metrics = jax.jit(losses.ppo_policy_loss)(logp, old_logp, advantages, mask, clip_eps)
    assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_allclose(metrics["clip_fraction"], expected_clip, atol=1e-6)
    assert_allclose(metrics["approx_kl"], expected_kl, rtol=1e-4, atol=1e-6)


def test_ppo_policy_loss_gradient_zero_where_clipped():
    mask = MASKS["mixed"]
    old_logp = random_normal(33, mask.shape) - 2
    logp = old_logp + 0.5 * random_normal(34, mask.shape)
    advantages = random_normal(35, mask.shape)
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old_logp, advantages, mask)[0])(
        jnp.asarray(logp)
    )

    # d/dlogp of -ρA is -ρA where the unclipped term is the larger loss, else 0; the mean
    # divides by the number of real tokens.
    count = mask.sum()
    expected = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        ratio = math.exp(logp[b, t] - old_logp[b, t])
        clipped_ratio = min(max(ratio, 0.8), 1.2)
        if mask[b, t] and -clipped_ratio * advantages[b, t] <= -ratio * advantages[b, t]:
            expected[b, t] = -ratio * advantages[b, t] / count
    assert np.any((expected == 0) & (mask == 1))
    assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_ppo_policy_loss_at_old_policy():
    mask = MASKS["left_padding"]
    logp = random_normal(36, mask.shape)
    advantages = random_normal(37, mask.shape)
    loss, metrics = losses.ppo_policy_loss(logp, logp, advantages, mask)
    # With ρ = 1 the loss is -mean(A), nothing is clipped and the KL is 0.
    assert_allclose(loss, -reference_mean(reference_masked_values(advantages, mask)), rtol=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0
    assert_allclose(metrics["ratio_mean"], 1.0)


@pytest.mark.parametrize("name", list(MASKS))
def test_value_loss_matches_loop(name):
    mask = MASKS[name]
    old_values = random_normal(38, mask.shape)
    values = old_values + 0.4 * random_normal(39, mask.shape)
    returns = random_normal(40, mask.shape)
    expected_loss, expected_clip = reference_value_loss(values, old_values, returns, mask, 0.2)

    loss, metrics = jax.jit(losses.value_loss)(values, old_values, returns, mask)
    assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_allclose(metrics["clip_fraction"], expected_clip, atol=1e-6)


@pytest.mark.parametrize("name", list(NONEMPTY_MASKS))
def test_explained_variance_matches_loop(name):
    mask = NONEMPTY_MASKS[name]
    returns = random_normal(41, mask.shape)
    values = returns + 0.5 * random_normal(42, mask.shape)
    real_returns = reference_masked_values(returns, mask)
    residuals = reference_masked_values(returns - values, mask)
    returns_var = reference_var(real_returns, unbiased=False)
    expected = 1 - reference_var(residuals, unbiased=False) / returns_var if returns_var else 0.0
    assert_allclose(losses.explained_variance(values, returns, mask), expected, atol=1e-5)


def test_explained_variance_bounds():
    mask = MASKS["right_padding"]
    returns = random_normal(43, mask.shape)
    assert_allclose(losses.explained_variance(returns, returns, mask), 1.0)
    # Constant returns have no variance to explain.
    assert float(losses.explained_variance(returns, np.ones(mask.shape), mask)) == 0.0


def test_shape_mismatch_names_arrays():
    with pytest.raises(ValueError, match=r"values \(2, 3\), old_values \(2, 4\)"):
        losses.value_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mask of shape \[B, T\]"):
        losses.last_token_index(np.ones(5))


# ---------------------------------------------------------------------------------------------
# Best-of-N statistics.


def test_expected_max_over_n_matches_enumeration():
    rewards = np.random.default_rng(44).normal(size=(3, 7))
    rewards[0, :3] = 0.25  # ties
    assert_allclose(
        losses.expected_max_over_n(rewards), brute_force_best_of_n(rewards, max), rtol=1e-12
    )


def test_expected_max_over_n_endpoints():
    rewards = np.random.default_rng(45).normal(size=(5, 12))
    curve = losses.expected_max_over_n(rewards)
    assert curve.shape == (12,)
    # N = 1 is the mean reward and N = K the mean of each prompt's best; the curve never falls.
    assert_allclose(curve[0], rewards.mean(), rtol=1e-12)
    assert_allclose(curve[-1], rewards.max(axis=1).mean(), rtol=1e-12)
    assert np.all(np.diff(curve) >= -1e-12)


def test_expected_median_over_n_matches_enumeration():
    rewards = np.random.default_rng(46).normal(size=(3, 7))
    rewards[1, 2:5] = -0.5  # ties
    assert_allclose(
        losses.expected_median_over_n(rewards),
        brute_force_best_of_n(rewards, lambda subset: float(np.median(subset))),
        rtol=1e-12,
    )


def test_best_of_n_rejects_bad_rewards():
    with pytest.raises(ValueError, match=r"shape \[prompts, samples\]"):
        losses.expected_max_over_n(np.zeros(4))
    with pytest.raises(ValueError, match="finite rewards"):
        losses.expected_median_over_n(np.array([[0.0, np.nan]]))
