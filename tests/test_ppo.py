"""Tests of llama_rlhf.ppo: the reward/advantage composition, the update and the whole loop.

Expected values of the RL math come from the plain numpy loops in this file (`reference_*`),
which walk over every row and token and share no code with the jax implementation, or from
hand arithmetic stated in a comment. The loop tests run `run_ppo` on a tiny random policy and
random reward models saved to a temporary folder, with the tokenizer of the synthetic world.
"""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from numpy.testing import assert_allclose

from configs import ppo as ppo_configs
from llama_rlhf import ppo
from llama_rlhf.data import synthetic
from llama_rlhf.data.chat import Message
from llama_rlhf.model import get_variant, param_shapes
from llama_rlhf.training.checkpoints import load_model, save_model
from llama_rlhf.training.metrics import read_metrics

# ---------------------------------------------------------------------------------------------
# numpy references.


def reference_token_rewards(score, kl, mask, beta):
    rewards = np.zeros(kl.shape)
    for b in range(kl.shape[0]):
        real = [t for t in range(kl.shape[1]) if mask[b, t]]
        for t in real:
            rewards[b, t] = -beta * kl[b, t]
        if real:
            rewards[b, real[-1]] += score[b]
    return rewards


def reference_gae(rewards, values, mask, gamma, lam):
    advantages = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(real):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t]
            advantages[b, t] = next_advantage
    returns = np.where(mask, advantages + values, 0.0)
    return advantages, returns


def reference_masked_whiten(x, mask):
    real = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mean = sum(real) / len(real)
    var = sum((v - mean) ** 2 for v in real) / (len(real) - 1)
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8)
    return out


def reference_kl(logp, ref_logp, kind):
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    return np.exp(log_ratio) - 1.0 - log_ratio


def reference_gate(helpfulness, safety, is_safety_prompt, threshold):
    gated, used = [], []
    for h, s, flag in zip(helpfulness, safety, is_safety_prompt, strict=True):
        use_safety = bool(flag) or s < threshold
        gated.append(s if use_safety else h)
        used.append(use_safety)
    return np.array(gated), np.array(used)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1.0 - p))


def compose(sequence_reward, logp, ref_logp, values, mask, *, beta=0.1, kind="k1",
            gamma=1.0, lam=0.95, whiten=False):
    out = ppo.compute_advantages(
        np.asarray(sequence_reward, np.float32), np.asarray(logp, np.float32),
        np.asarray(ref_logp, np.float32), np.asarray(values, np.float32), np.asarray(mask, bool),
        beta=beta, kl_estimator=kind, gamma=gamma, lam=lam, whiten_advantages=whiten,
    )
    return {name: np.asarray(value) for name, value in out.items()}


# A response [t0, t1, EOS, PAD, PAD].
EOS_MASK = np.array([[1, 1, 1, 0, 0]], bool)


# ---------------------------------------------------------------------------------------------
# Rewards and advantages.


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_score_lands_on_eos(kind):
    logp = np.array([[-1.0, -2.0, -0.5, 0.0, 0.0]])
    out = compose([1.0], logp, logp, np.zeros((1, 5)), EOS_MASK, beta=0.01, kind=kind)
    # Identical log-probabilities: no KL, so only the score remains, at the EOS (index 2).
    assert_allclose(out["kl"], np.zeros((1, 5)), atol=0)
    assert_allclose(out["rewards"], [[0.0, 0.0, 1.0, 0.0, 0.0]], atol=0)


def test_gae_of_eos_example():
    logp = np.zeros((1, 5))
    out = compose([1.0], logp, logp, np.zeros((1, 5)), EOS_MASK, gamma=1.0, lam=0.95)
    # With V = 0 and γ = 1: A_2 = 1, A_1 = γλ A_2 = 0.95, A_0 = 0.95² = 0.9025; padding 0.
    assert_allclose(out["advantages"], [[0.9025, 0.95, 1.0, 0.0, 0.0]], rtol=1e-6)
    assert_allclose(out["returns"], [[0.9025, 0.95, 1.0, 0.0, 0.0]], rtol=1e-6)


def random_rollout(seed, batch=4, length=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([length, 3, 1, 5])[:batch]
    mask = np.arange(length)[None, :] < lengths[:, None]
    logp = rng.normal(-2.0, 0.5, (batch, length))
    ref_logp = logp + rng.normal(0.0, 0.3, (batch, length))
    values = rng.normal(0.0, 1.0, (batch, length))
    score = rng.normal(0.0, 1.0, batch)
    return score, logp, ref_logp, values, mask


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_advantages_match_numpy(kind, gamma, lam):
    score, logp, ref_logp, values, mask = random_rollout(0)
    beta = 0.05
    out = compose(score, logp, ref_logp, values, mask, beta=beta, kind=kind, gamma=gamma,
                  lam=lam, whiten=True)

    kl = np.where(mask, reference_kl(logp, ref_logp, kind), 0.0)
    rewards = reference_token_rewards(score, kl, mask, beta)
    advantages, returns = reference_gae(rewards, values, mask, gamma, lam)
    assert_allclose(out["kl"], kl, rtol=1e-5, atol=1e-6)
    assert_allclose(out["rewards"], rewards, rtol=1e-5, atol=1e-6)
    assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
    assert_allclose(out["advantages"], reference_masked_whiten(advantages, mask), rtol=1e-4,
                    atol=1e-5)


def test_advantage_whitening_ignores_padding():
    score, logp, ref_logp, values, mask = random_rollout(1)
    clean = compose(score, logp, ref_logp, values, mask, whiten=True)
    # Garbage on padding must change nothing on real tokens.
    noisy = [np.where(mask, array, 1e6) for array in (logp, ref_logp, values)]
    dirty = compose(score, *noisy, mask, whiten=True)
    assert_allclose(dirty["advantages"], clean["advantages"], rtol=1e-6, atol=1e-6)
    assert np.all(dirty["advantages"][~mask] == 0.0)
    real = clean["advantages"][mask]
    assert abs(real.mean()) < 1e-5
    assert abs(real.std(ddof=1) - 1.0) < 1e-4


@pytest.mark.parametrize("is_safety_prompt", [False, True])
def test_gating_at_threshold(is_safety_prompt):
    safety = np.array([0.10, 0.1499, 0.15, 0.1501, 0.9])
    helpfulness = np.array([0.7, 0.6, 0.5, 0.4, 0.3])
    flags = np.full(5, is_safety_prompt)
    scores = ppo.gate_scores(logit(helpfulness), logit(safety), flags, threshold=0.15)

    expected, used = reference_gate(sigmoid(logit(helpfulness)), sigmoid(logit(safety)), flags,
                                    0.15)
    assert_allclose(scores.gated, expected, rtol=1e-6)
    np.testing.assert_array_equal(scores.used_safety, used)
    assert_allclose(scores.logit_gated, logit(expected), rtol=1e-4)
    if not is_safety_prompt:
        # Strictly below 0.15 uses the safety score: 0.10 and 0.1499 only.
        np.testing.assert_array_equal(used, [True, True, False, False, False])


def test_gating_without_safety_model():
    scores = ppo.gate_scores(np.array([0.0, 2.0]), None, np.array([True, False]))
    assert_allclose(scores.gated, sigmoid([0.0, 2.0]), rtol=1e-6)
    assert not scores.used_safety.any()


def test_whitening_statistics_follow_the_gate():
    used = np.array([True, False, True])
    helpfulness = ppo.ScoreStatistics(mean=1.0, std=2.0)
    safety = ppo.ScoreStatistics(mean=-1.0, std=0.5)
    mean, std = ppo.whitening_statistics("metadata", used, helpfulness, safety, None)
    assert_allclose(mean, [-1.0, 1.0, -1.0])
    assert_allclose(std, [0.5, 2.0, 0.5])

    scores = ppo.gate_scores(np.array([3.0, 3.0, 3.0]), np.array([-4.0, 2.0, 0.0]),
                             np.array([False, False, True]))
    reward = ppo.sequence_rewards(scores, *ppo.whitening_statistics(
        "metadata", scores.used_safety, helpfulness, safety, None))
    # Rows: safety -4 < logit(0.15) so (−4 + 1) / 0.5; helpfulness (3 − 1) / 2; safety prompt
    # (0 + 1) / 0.5.
    assert_allclose(reward, [-6.0, 1.0, 2.0], rtol=1e-4)


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, n) for n in (5, 1, 17)]
    running = ppo.RunningMoments()
    for batch in batches:
        running.update(batch)
    everything = np.concatenate(batches)
    assert running.count == everything.size
    assert_allclose(running.mean, everything.mean(), rtol=1e-12)
    assert_allclose(running.std, everything.std(ddof=1), rtol=1e-12)
    mean, std = ppo.whitening_statistics("running", np.zeros(2, bool), None, None, running)
    assert_allclose(mean, [everything.mean()] * 2, rtol=1e-6)


def test_prompt_order_is_a_function_of_position():
    first = ppo.prompt_order(10, seed=3, start=0, count=25)
    again = np.concatenate([ppo.prompt_order(10, 3, 0, 12), ppo.prompt_order(10, 3, 12, 13)])
    np.testing.assert_array_equal(first, again)
    # Each epoch is a permutation of all prompts.
    np.testing.assert_array_equal(np.sort(first[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(first[10:20]), np.arange(10))


# ---------------------------------------------------------------------------------------------
# Prompts and configs.


def test_prompt_rejects_mixed_dialog():
    with pytest.raises(ValueError, match="all chat.Message objects or all token ids"):
        ppo.Prompt((Message("user", "hi"), 3))


def test_read_prompts_names_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = {"dialog": [{"role": "user", "content": "Hi"}], "is_safety_prompt": True}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"dialog": "Hi"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object"):
        ppo.read_prompts_jsonl(path)

    path.write_text(json.dumps({"dialog": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: .*expected 'user'"):
        ppo.read_prompts_jsonl(path)


def test_prompts_round_trip(tmp_path):
    prompts = [ppo.Prompt((Message("system", "Be brief."), Message("user", "Hi")), True),
               ppo.Prompt((Message("user", "Name a cat."),))]
    ppo.write_prompts_jsonl(tmp_path / "p.jsonl", prompts)
    assert ppo.read_prompts_jsonl(tmp_path / "p.jsonl") == prompts


def test_config_variants():
    assert ppo_configs.VARIANTS == ("tiny", "7b", "13b", "34b", "70b")
    betas = {name: ppo_configs.get_config(name).reward.beta for name in ("7b", "13b", "34b",
                                                                         "70b")}
    assert betas == {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
    config = ppo_configs.get_config("70b")
    assert (config.rollout.batch_size, config.ppo.minibatch_size) == (512, 64)
    assert config.optimizer.learning_rate == 1e-6
    assert config.optimizer.schedule == "constant"
    assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.95, 1e-5)
    assert (config.optimizer.weight_decay, config.optimizer.grad_clip) == (0.1, 1.0)
    with pytest.raises(ValueError, match="Unknown PPO variant"):
        ppo_configs.get_config("8b")
    with pytest.raises(AttributeError):
        config.reward.betta = 0.1


def test_check_config_names_field():
    config = ppo_configs.get_config("tiny")
    with config.unlocked():
        config.ppo.minibatch_size = 24
    with pytest.raises(ValueError, match=r"rollout.batch_size \(64\) must be a positive multiple"):
        ppo._check_config(config)


# ---------------------------------------------------------------------------------------------
# The whole loop on tiny random models.


def random_params(config, head, seed, eos_id=None):
    """Random parameters without compiling an initializer; with `eos_id`, EOS is likely."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(shape.shape, np.float32)
        if "score_bias" in name:
            return np.zeros(shape.shape, np.float32)
        return rng.normal(0.0, 0.02, shape.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config, head))
    if eos_id is not None:
        # A constant first embedding coordinate survives to the last RMSNorm (≈ √D there), so
        # lm_head[0, EOS] = 0.5 raises the EOS logit by about 4 at every position: responses
        # end after a few tokens and are right-padded.
        params["embed"][:, 0] = 1.0
        params["lm_head"][0, :] = 0.0
        params["lm_head"][0, eos_id] = 0.5
    return params


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """Turns on JAX's persistent compilation cache for this module's runs, then off again.

    Every `run_ppo` call builds new jitted functions, so without the cache each run compiles
    the sampler and the train step again. That takes about a minute on 2 busy CPU cores, and
    with the cache the later runs load the programs instead.
    """
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, xla_cache):
    root = tmp_path_factory.mktemp("ppo_setup")
    world = synthetic.SyntheticWorld(seed=0, num_animals=4)
    tokenizer = synthetic.build_tokenizer(root, vocab_size=512, world=world)
    config = get_variant("tiny", vocab_size=512, max_seq_len=128)
    save_model(root / "policy", config, random_params(config, "lm", 0, tokenizer.eos_id),
               head="lm")
    for seed, kind in enumerate(("helpfulness", "safety"), start=1):
        save_model(root / kind, config, random_params(config, "scalar", seed), head="scalar",
                   metadata={"kind": kind, "score_mean": 0.0, "score_std": 0.05})
    prompts = [ppo.Prompt(p.messages, p.is_safety_prompt) for p in world.prompts(48, seed=1)]
    return {
        "tokenizer": tokenizer,
        "policy_init": str(root / "policy"),
        "reward_models": {"helpfulness": root / "helpfulness", "safety": root / "safety"},
        "train_prompts": prompts[:32],
        "eval_prompts": prompts[32:],
    }


def loop_config(**changes):
    config = ppo_configs.get_config("tiny,smoke")
    with config.unlocked():
        config.synthetic.enabled = False
        # One device: compiling for the 8 fake CPU devices of the test process takes minutes.
        config.num_devices = 1
        config.rollout.batch_size = 16
        config.rollout.sampling_batch_size = 16
        config.ppo.minibatch_size = 4
        config.rollout.max_prompt_length = 32
        config.rollout.max_response_length = 16
        # As many held-out prompts as a rollout batch: evaluation reuses the compiled programs.
        config.prompts.num_eval = 16
        config.num_iterations = 2
        config.eval_every = 1
        config.checkpoint_every = 1
        for name, value in changes.items():
            target = config
            *parents, leaf = name.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
    config.lock()
    return config


def run(config, workdir, setup):
    return ppo.run_ppo(
        config, workdir, policy_init=setup["policy_init"],
        reward_models=setup["reward_models"], train_prompts=setup["train_prompts"],
        eval_prompts=setup["eval_prompts"], tokenizer=setup["tokenizer"],
    )


def ppo_records(workdir):
    return [r for r in read_metrics(workdir) if any(k.startswith("ppo/") for k in r)]


def test_zero_learning_rate_keeps_log_ratio_at_zero(tiny_setup, tmp_path):
    # With lr 0 the policy never changes, so every minibatch's recomputed log-probabilities must
    # equal the sampler's: any gap would come from positions, masks or logit processing.
    # The unchanged policy never improves the held-out reward, so with patience 2 early
    # stopping ends the run after the evaluation of iteration 2 of 4.
    config = loop_config(**{"optimizer.learning_rate": 0.0, "value_optimizer.learning_rate": 0.0,
                            "num_iterations": 4, "early_stopping.patience": 2})
    prompt_lengths = {len(p.encode(tiny_setup["tokenizer"])) for p in tiny_setup["train_prompts"]}
    assert len(prompt_lengths) > 2  # left padding differs between rows

    result = run(config, tmp_path, tiny_setup)

    assert result["stopped_early"]
    assert result["iterations"] == 2
    assert result["best_step"] == 0
    records = ppo_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        # 4 minibatches per iteration; log_ratio_max is the largest over all of them.
        assert record["ppo/log_ratio_max"] < 1e-5
        assert record["ppo/policy_clip_fraction"] == 0.0
        # Responses end early at EOS, so the right padding is exercised too.
        assert 1.0 < record["ppo/response_length"] < 16.0
        assert record["ppo/eos_fraction"] > 0.5
        assert abs(record["ppo/kl"]) < 1e-5
    for name in ("reward_helpfulness", "reward_safety", "reward_gated", "reward_whitened",
                 "kl", "policy_clip_fraction", "value_clip_fraction", "value_loss",
                 "explained_variance", "entropy", "response_length", "time_generation",
                 "time_scoring", "time_training"):
        assert f"ppo/{name}" in records[0], name

    exported = load_model(result["model_dir"])
    initial = load_model(tiny_setup["policy_init"])
    assert exported.head == "lm"
    jax.tree.map(np.testing.assert_array_equal, exported.params, initial.params)


def test_resume_matches_uninterrupted_run(tiny_setup, tmp_path, monkeypatch):
    config = loop_config(**{"optimizer.learning_rate": 1e-3, "value_optimizer.learning_rate": 1e-3,
                            "num_iterations": 3, "checkpoint_every": 1})
    straight = run(config, tmp_path / "straight", tiny_setup)

    iteration_fn = ppo._ppo_iteration

    def crash_in_third(iteration, *args, **kwargs):
        if iteration == 2:
            raise KeyboardInterrupt("simulated interruption")
        return iteration_fn(iteration, *args, **kwargs)

    monkeypatch.setattr(ppo, "_ppo_iteration", crash_in_third)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "resumed", tiny_setup)
    monkeypatch.setattr(ppo, "_ppo_iteration", iteration_fn)
    resumed = run(config, tmp_path / "resumed", tiny_setup)

    assert resumed["iterations"] == straight["iterations"] == 3
    assert resumed["best_step"] == straight["best_step"]
    a, b = ppo_records(tmp_path / "straight"), ppo_records(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3]
    for name in ("ppo/reward_gated", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"):
        assert_allclose([r[name] for r in b], [r[name] for r in a], rtol=1e-5, atol=1e-7)
    straight_params = load_model(straight["model_dir"]).params
    resumed_params = load_model(resumed["model_dir"]).params
    jax.tree.map(lambda x, y: assert_allclose(x, y, rtol=1e-6, atol=1e-7), straight_params,
                 resumed_params)
    checkpoint_steps = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()
                              if p.name.isdigit())
    assert checkpoint_steps[-1] == 3


def test_run_rejects_reward_model_without_statistics(tiny_setup, tmp_path):
    config = get_variant("tiny", vocab_size=512, max_seq_len=128)
    save_model(tmp_path / "rm", config, random_params(config, "scalar", 5), head="scalar",
               metadata={"kind": "helpfulness"})
    setup = dict(tiny_setup, reward_models={"helpfulness": tmp_path / "rm", "safety": None})
    with pytest.raises(ValueError, match="stores no score statistics"):
        run(loop_config(), tmp_path / "run", setup)


def test_run_state_checks_seed():
    config = ppo_configs.get_config("tiny")
    extra = ppo._RunState(completed=3).to_extra(config)
    assert ppo._RunState.from_extra(extra, config).completed == 3
    with config.unlocked():
        config.seed = 1
    with pytest.raises(ValueError, match="written with seed 0"):
        ppo._RunState.from_extra(extra, config)


def test_prompt_too_long_is_dropped(tiny_setup):
    tokenizer = tiny_setup["tokenizer"]
    prompts = [ppo.Prompt((Message("user", "Hi"),)), ppo.Prompt(tuple(range(3, 40)))]
    encoded = ppo.encode_prompts(prompts, tokenizer, 20, name="test")
    assert encoded.num_dropped == 1
    assert len(encoded) == 1
    with pytest.raises(ValueError, match="All 1 test prompts are longer"):
        ppo.encode_prompts(prompts[1:], tokenizer, 20, name="test")


def test_response_slice_predicts_response():
    # The outputs at P - 1 .. T - 2 belong to the response tokens P .. T - 1.
    per_position = np.arange(10)[None, :] * np.ones((2, 1))
    assert_allclose(ppo.response_slice(per_position, 4), [[5, 6, 7, 8]] * 2)


def test_microbatches_give_the_same_gradient(tiny_setup):
    # Token-weighted accumulation over 2 microbatches of unequal token counts must reproduce
    # the gradient of the token mean over the whole minibatch.
    policy = load_model(tiny_setup["policy_init"])
    rng = np.random.default_rng(0)
    prompt_length, response_length = 6, 5
    tokens = rng.integers(3, 500, (4, prompt_length + response_length)).astype(np.int32)
    prompt_mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    response_mask = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    batch = {
        "tokens": tokens,
        "mask": np.concatenate([prompt_mask, response_mask], axis=1).astype(bool),
        "response_mask": response_mask.astype(bool),
        "logp": rng.normal(-6.0, 0.1, (4, response_length)).astype(np.float32),
        "advantages": rng.normal(0.0, 1.0, (4, response_length)).astype(np.float32),
    }
    settings = ppo.UpdateSettings(temperature=0.7, clip_eps=0.2, value_clip=0.2)
    loss_fn = functools.partial(ppo._policy_loss, model_config=policy.config, settings=settings)
    gradients = jax.jit(ppo._token_weighted_gradients, static_argnums=(0, 3))

    whole_grads, whole_metrics, whole_max = gradients(loss_fn, policy.params, batch, 1)
    split_grads, split_metrics, split_max = gradients(loss_fn, policy.params, batch, 2)

    jax.tree.map(lambda x, y: assert_allclose(x, y, rtol=1e-4, atol=1e-7), whole_grads,
                 split_grads)
    for name, (total, count) in whole_metrics.items():
        split_total, split_count = split_metrics[name]
        assert_allclose(split_total / split_count, total / count, rtol=1e-5, err_msg=name)
    assert_allclose(split_max, whole_max, rtol=1e-6)


SYNTHETIC_SETUP_SCRIPT = """
import json, sys
import ml_collections
from configs import ppo as ppo_configs
from llama_rlhf import synthetic
from llama_rlhf.training.checkpoints import load_model

directory = sys.argv[1]
config = ml_collections.ConfigDict(ppo_configs.get_config("tiny,smoke").synthetic.to_dict())
config.num_comparisons = 32
config.policy_sft_steps = 2
config.reward_model_steps = 2
setup = synthetic.build_synthetic_setup(config, directory, seed=0)
again = synthetic.build_synthetic_setup(config, directory, seed=0)
config.reward_model_steps = 3
try:
    synthetic.build_synthetic_setup(config, directory, seed=0)
    changed = "built"
except ValueError as error:
    changed = str(error)
models = {name: load_model(getattr(setup, name)) for name in
          ("policy_dir", "helpfulness_dir", "safety_dir")}
print(json.dumps({
    "heads": {name: model.head for name, model in models.items()},
    "metadata": {name: model.metadata for name, model in models.items()},
    "same_dirs": str(again.policy_dir) == str(setup.policy_dir),
    "num_train_prompts": len(setup.train_prompts),
    "num_eval_prompts": len(setup.eval_prompts),
    "gold": setup.gold_metrics(setup.eval_prompts[:2], ["I can't help with that."] * 2),
    "changed": changed,
}))
"""


def test_synthetic_setup_builds_and_reloads(tmp_path):
    # A subprocess with one CPU device: the reward-model stage meshes over every device, and
    # compiling it for the 8 fake devices of this process would take minutes.
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-c", SYNTHETIC_SETUP_SCRIPT, str(tmp_path / "setup")],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert result["heads"] == {"policy_dir": "lm", "helpfulness_dir": "scalar",
                               "safety_dir": "scalar"}
    for name in ("helpfulness_dir", "safety_dir"):
        assert math.isfinite(result["metadata"][name]["score_mean"])
        assert result["metadata"][name]["score_std"] > 0
    assert result["metadata"]["helpfulness_dir"]["kind"] == "helpfulness"
    assert result["metadata"]["safety_dir"]["kind"] == "safety"
    assert result["same_dirs"]
    assert result["num_train_prompts"] == 32
    assert result["num_eval_prompts"] == 8
    # A bare refusal contains no harmful instructions; every gold part lies in [0, 1].
    assert result["gold"]["unsafe_fraction"] == 0.0
    for name in ("gold", "gold_helpfulness", "gold_safety"):
        assert 0.0 <= result["gold"][name] <= 1.0, name
    assert "was built with other settings" in result["changed"]
    assert (tmp_path / "setup" / "setup.json").is_file()
