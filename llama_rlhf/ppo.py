"""PPO with the Llama 2-Chat reward: gated safety/helpfulness scores, logit, whitening, KL.

Llama 2-Chat's last RLHF version ran PPO on top of the rejection-sampling policy (Touvron et al.
2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288, section 3.2.3).
One iteration of this module:

  1. Rollout. A batch of prompts, chat-formatted and left-padded to `max_prompt_length` P, is
     sampled with `sampling.Sampler` at the policy's temperature. Each row of the rollout is the
     prompt followed by its response, right-padded to `max_response_length` N:

         [pad pad BOS [INST] ... [/INST] | r_1 r_2 ... EOS pad pad]
          <------------- P ------------>   <--------- N -------->

     Positions count real tokens only (the model derives them from the mask), and the response
     mask marks the generated tokens up to and including EOS. The sampler returns the
     log-probabilities of the sampled tokens under the distribution it sampled from (logits
     divided by the temperature; PPO uses no top-k or top-p filtering).
  2. Scoring. The frozen reference (the initial policy) scores the same tokens teacher-forced
     with the same logit processing. The value model gives V(s_t) for the state before each
     response token, and the helpfulness and safety reward models score prompt + response at
     its last real token.
  3. Reward. R_c is the calibrated safety score σ(s) when the prompt is tagged as a safety
     prompt or σ(s) < 0.15, else the calibrated helpfulness score σ(h). The sequence reward is
     R̃_c = whiten(logit(R_c)), and the per-token reward is r_t = -β KL_t plus R̃_c at the last
     real response token. The KL estimator (k1 or k3) is configurable, and the logged KL is
     that estimator.
  4. Advantages. GAE with γ = 1 and λ = 0.95 over the real response tokens, then advantages
     whitened over the real tokens of the whole batch.
  5. Update. The batch is shuffled and split into minibatches. Each minibatch takes one
     gradient step of the clipped policy loss on the policy and one of the clipped value loss
     on the value model, which are separate train states with separate optimizers.

Whitening statistics (`config.reward.whitening`): "metadata" (the default) whitens logit(R_c)
with the score mean and standard deviation stored with the reward model that produced R_c.
Because logit(σ(x)) = x away from the clip at ±13.8, these are the statistics of logit(R_c) on
the reward model's held-out set, they do not drift with the policy, and β keeps one meaning
over the run. "running" uses running statistics of logit(R_c) over all rollouts so far, saved
in the checkpoints.

Every iteration writes `ppo/` metrics and one console line. Evaluation on held-out prompts
writes `eval/` metrics and drives early stopping, and the exported policy (`workdir/model`) is
the one of the best evaluation. Checkpoints hold both train states, the iteration, the running
statistics and the early-stopping state, so rerunning with the same workdir resumes. The
rollout randomness and the prompt order are functions of (seed, iteration), so a resumed run
repeats what an uninterrupted run would do.

Known gaps: responses cut at `max_response_length` without EOS get their score at their last
token, with no penalty for the truncation. The reference model is held in memory next to the
policy, the value model and the reward models, with no offloading.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llama_rlhf import losses
from llama_rlhf import sampling as sampling_lib
from llama_rlhf import sharding as shd
from llama_rlhf.data import chat
from llama_rlhf.data.tokenizer import load_tokenizer
from llama_rlhf.model import Llama, LlamaConfig
from llama_rlhf.reward_model import scoring as reward_scoring
from llama_rlhf.reward_model.scoring import RewardModel
from llama_rlhf.training.checkpoints import Checkpointer, load_initial_params, save_model
from llama_rlhf.training.metrics import MetricWriter, reduce_metrics, save_config
from llama_rlhf.training.optim import make_optimizer
from llama_rlhf.training.state import create_train_state, train_state_shardings

logger = logging.getLogger(__name__)

# Metrics of the held-out evaluation that early stopping can monitor (higher is better).
EARLY_STOPPING_METRICS = (
    "reward_gated",
    "reward_whitened",
    "reward_helpfulness",
    "reward_safety",
)
WHITENING_MODES = ("metadata", "running")
PPO_KL_ESTIMATORS = ("k1", "k3")
# LlamaConfig fields that `config.model_overrides` may change for the policy, the reference
# and the value model: numerics only, never shapes.
COMPUTE_OVERRIDES = ("dtype", "remat_policy")


# ---------------------------------------------------------------------------------------------
# Prompts.


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One PPO prompt.

    Attributes:
      dialog: the conversation so far, ending with a user message, as chat `Message`s; or the
        prompt already encoded as token ids (BOS and chat tags included).
      is_safety_prompt: whether the prompt was collected as a possibly unsafe prompt, in which
        case the safety reward model always scores its responses.
    """

    dialog: tuple[chat.Message, ...] | tuple[int, ...]
    is_safety_prompt: bool = False

    def __post_init__(self):
        dialog = tuple(self.dialog)
        if not dialog:
            raise ValueError("A PPO prompt needs at least one message or token id.")
        is_ids = all(isinstance(item, (int, np.integer)) for item in dialog)
        is_messages = all(isinstance(item, chat.Message) for item in dialog)
        if not (is_ids or is_messages):
            raise ValueError(
                "A PPO prompt's dialog must be all chat.Message objects or all token ids, got "
                f"{sorted({type(item).__name__ for item in dialog})}."
            )
        if is_ids:
            dialog = tuple(int(item) for item in dialog)
        object.__setattr__(self, "dialog", dialog)
        object.__setattr__(self, "is_safety_prompt", bool(self.is_safety_prompt))

    def encode(self, tokenizer) -> list[int]:
        """Returns the prompt's token ids: the chat format of Meta's `chat_completion`."""
        if isinstance(self.dialog[0], chat.Message):
            return chat.encode_prompt(tokenizer, self.dialog)
        return list(self.dialog)


def read_prompts_jsonl(path: str | os.PathLike) -> list[Prompt]:
    """Reads prompts from JSON lines {"dialog": [{"role", "content"}, ...], "is_safety_prompt"}.

    `is_safety_prompt` defaults to false. The dialog must end with a user message.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a line is not such an object; the message names the file and line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    prompts = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON: {error}") from error
            if not isinstance(record, dict) or not isinstance(record.get("dialog"), list):
                raise ValueError(
                    f"{where}: expected an object with a list field 'dialog', got {line[:80]!r}."
                )
            try:
                messages = tuple(
                    chat.Message(turn["role"], turn["content"]) for turn in record["dialog"]
                )
                chat.validate_dialog(messages, last_role="user")
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"{where}: each dialog turn needs 'role' and 'content' fields ({error})."
                ) from error
            except chat.ChatFormatError as error:
                raise ValueError(f"{where}: {error}") from error
            is_safety = record.get("is_safety_prompt", False)
            if not isinstance(is_safety, bool):
                raise ValueError(f"{where}: 'is_safety_prompt' must be true or false.")
            prompts.append(Prompt(messages, is_safety))
    if not prompts:
        raise ValueError(f"Prompt file {path} contains no prompts.")
    return prompts


def write_prompts_jsonl(path: str | os.PathLike, prompts: Sequence[Prompt]) -> None:
    """Writes prompts given as messages in the format of `read_prompts_jsonl`, atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        for prompt in prompts:
            if not isinstance(prompt.dialog[0], chat.Message):
                raise ValueError("write_prompts_jsonl needs prompts given as chat messages.")
            record = {
                "dialog": [dataclasses.asdict(message) for message in prompt.dialog],
                "is_safety_prompt": prompt.is_safety_prompt,
            }
            file.write(json.dumps(record) + "\n")
    os.replace(temporary, path)


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """Prompts as token ids, the ones longer than the limit dropped.

    Attributes:
      prompts: the kept prompts.
      ids: token ids of each kept prompt.
      is_safety_prompt: bool [num_kept].
      num_dropped: prompts dropped because they had more than max_prompt_length tokens.
    """

    prompts: tuple[Prompt, ...]
    ids: tuple[tuple[int, ...], ...]
    is_safety_prompt: np.ndarray
    num_dropped: int

    def __len__(self) -> int:
        return len(self.ids)


def encode_prompts(
    prompts: Sequence[Prompt], tokenizer, max_prompt_length: int, *, name: str
) -> EncodedPrompts:
    """Encodes prompts with the chat format and drops those longer than `max_prompt_length`.

    Cutting a prompt would remove its BOS and [INST] tags, so long prompts are dropped and
    counted instead.

    Raises:
      ValueError: no prompt is short enough, or the list is empty. The message includes
        `name`.
    """
    if not prompts:
        raise ValueError(f"The {name} prompts are empty.")
    kept, ids, is_safety = [], [], []
    for prompt in prompts:
        encoded = prompt.encode(tokenizer)
        if len(encoded) <= max_prompt_length:
            kept.append(prompt)
            ids.append(tuple(encoded))
            is_safety.append(prompt.is_safety_prompt)
    dropped = len(prompts) - len(ids)
    if not ids:
        raise ValueError(
            f"All {len(prompts)} {name} prompts are longer than max_prompt_length "
            f"({max_prompt_length} tokens); raise rollout.max_prompt_length."
        )
    if dropped:
        logger.warning(
            "Dropped %d of %d %s prompts longer than %d tokens.",
            dropped, len(prompts), name, max_prompt_length,
        )
    return EncodedPrompts(tuple(kept), tuple(ids), np.asarray(is_safety, bool), dropped)


def prompt_order(num_prompts: int, seed: int, start: int, count: int) -> np.ndarray:
    """Returns the indices of the training prompts at stream positions [start, start + count).

    The stream goes through one random permutation of the prompts per epoch, epoch e's
    permutation drawn from (seed, e). It is a function of the position alone, so a resumed
    run reads the same prompts as an uninterrupted one.
    """
    positions = np.arange(start, start + count)
    epochs = positions // num_prompts
    indices = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(num_prompts)
        selected = epochs == epoch
        indices[selected] = permutation[positions[selected] % num_prompts]
    return indices


# ---------------------------------------------------------------------------------------------
# Rewards and advantages: pure functions of one rollout batch.


@dataclasses.dataclass(frozen=True)
class GatedScores:
    """Reward-model scores of a rollout batch, each [B].

    Attributes:
      helpfulness: σ(helpfulness score), the calibrated helpfulness reward R_h.
      safety: σ(safety score), R_s; NaN without a safety reward model.
      gated: R_c, R_s where the safety reward was used and R_h elsewhere.
      logit_gated: logit(R_c), the quantity that gets whitened.
      used_safety: bool, where R_c = R_s.
    """

    helpfulness: np.ndarray
    safety: np.ndarray
    gated: np.ndarray
    logit_gated: np.ndarray
    used_safety: np.ndarray


def gate_scores(
    helpfulness_raw: np.ndarray,
    safety_raw: np.ndarray | None,
    is_safety_prompt: np.ndarray,
    threshold: float = losses.SAFETY_THRESHOLD,
) -> GatedScores:
    """Calibrates and gates the two reward-model scores of each response (Llama 2's rule).

    R_h = σ(h), R_s = σ(s), R_c = R_s if is_safety_prompt or R_s < threshold else R_h.
    Without a safety model (`safety_raw` None) R_c = R_h for every prompt.

    Args:
      helpfulness_raw: raw helpfulness reward-model outputs h, [B].
      safety_raw: raw safety reward-model outputs s, [B], or None.
      is_safety_prompt: bool [B].
      threshold: the safety score below which the safety reward is used.
    """
    helpfulness = jax.nn.sigmoid(jnp.asarray(helpfulness_raw, jnp.float32))
    if safety_raw is None:
        safety = jnp.full(helpfulness.shape, jnp.nan, jnp.float32)
        gated, used_safety = helpfulness, jnp.zeros(helpfulness.shape, bool)
    else:
        safety = jax.nn.sigmoid(jnp.asarray(safety_raw, jnp.float32))
        gated, used_safety = losses.gate_rewards(helpfulness, safety, is_safety_prompt, threshold)
    return GatedScores(
        helpfulness=np.asarray(helpfulness),
        safety=np.asarray(safety),
        gated=np.asarray(gated),
        logit_gated=np.asarray(losses.logit(gated)),
        used_safety=np.asarray(used_safety),
    )


@dataclasses.dataclass
class RunningMoments:
    """Running mean and variance of a stream of values (Chan et al.'s parallel update).

    Attributes:
      count: number of values seen.
      mean: their mean.
      m2: the sum of squared deviations from the mean.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: np.ndarray) -> None:
        """Merges a batch: with n = n_a + n_b and δ = mean_b - mean_a,
        mean = mean_a + δ n_b / n and M2 = M2_a + M2_b + δ² n_a n_b / n."""
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size == 0:
            return
        batch_count = float(values.size)
        batch_mean = float(values.mean())
        batch_m2 = float(np.sum(np.square(values - batch_mean)))
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total

    @property
    def std(self) -> float:
        """The unbiased standard deviation; 1 before two values have been seen."""
        if self.count < 2:
            return 1.0
        return math.sqrt(self.m2 / (self.count - 1.0))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScoreStatistics:
    """Mean and standard deviation of a reward model's raw scores, used for whitening."""

    mean: float
    std: float


def whitening_statistics(
    mode: str,
    used_safety: np.ndarray,
    helpfulness_stats: ScoreStatistics | None,
    safety_stats: ScoreStatistics | None,
    running: RunningMoments | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (mean, std) [B] that whiten logit(R_c) of each response.

    "metadata": the statistics of the reward model that produced each R_c. "running": the
    running statistics of logit(R_c), the same for every response.
    """
    batch = used_safety.shape[0]
    if mode == "running":
        if running is None:
            raise ValueError("Whitening mode 'running' needs running statistics.")
        return np.full(batch, running.mean, np.float32), np.full(batch, running.std, np.float32)
    if mode != "metadata":
        raise ValueError(f"Unknown whitening mode {mode!r}; expected one of {WHITENING_MODES}.")
    if helpfulness_stats is None:
        raise ValueError("Whitening mode 'metadata' needs the helpfulness model's statistics.")
    mean = np.full(batch, helpfulness_stats.mean, np.float32)
    std = np.full(batch, helpfulness_stats.std, np.float32)
    if used_safety.any():
        if safety_stats is None:
            raise ValueError("Whitening mode 'metadata' needs the safety model's statistics.")
        mean = np.where(used_safety, np.float32(safety_stats.mean), mean)
        std = np.where(used_safety, np.float32(safety_stats.std), std)
    return mean, std


def sequence_rewards(
    scores: GatedScores, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Returns R̃_c = whiten(logit(R_c)) = (logit(R_c) - mean) / std, [B]."""
    return np.asarray(losses.whiten(scores.logit_gated, mean, std))


def compute_advantages(
    sequence_reward: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array,
    values: jax.Array,
    response_mask: jax.Array,
    *,
    beta: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten_advantages: bool,
) -> dict[str, jax.Array]:
    """Turns one rollout batch into per-token rewards, advantages and value targets.

      kl_t = KL estimator(logp_t, ref_logp_t)           on real response tokens, else 0
      r_t  = -β kl_t + [t is the last real token] R̃_c
      A, R = GAE(r, V, γ, λ) over real tokens;  A ← whiten(A) over the real tokens of the batch

    Args:
      sequence_reward: R̃_c, [B].
      logp: log-probabilities of the response tokens under the sampling policy, [B, N].
      ref_logp: the same under the reference policy, [B, N].
      values: V(s_t) of the state before each response token, [B, N].
      response_mask: [B, N], True on generated tokens up to and including EOS.
      beta: KL coefficient β.
      kl_estimator: "k1" or "k3" (static).
      gamma, lam: GAE's γ and λ.
      whiten_advantages: whether to whiten the advantages (static).

    Returns:
      A dict of [B, N] float32 arrays: kl, rewards, advantages, returns (returns = A + V
      before whitening); all 0 on padding.
    """
    mask = response_mask.astype(bool)
    kl = jnp.where(mask, losses.kl_estimate(logp, ref_logp, kl_estimator), 0.0)
    rewards = losses.token_rewards(sequence_reward, kl, mask, beta)
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask)
    return {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}


# ---------------------------------------------------------------------------------------------
# Teacher-forced scoring of rollouts and the PPO update step.
#
# A rollout row is [prompt (P, left-padded) | response (N, right-padded)], T = P + N. The model's
# output at index t is about the prefix ending at t, so the outputs at indices P - 1 .. T - 2
# belong to the states before response tokens 0 .. N - 1.


def response_slice(per_position: jax.Array, response_length: int) -> jax.Array:
    """Selects the outputs [B, N, ...] at the states before each response token from [B, T, ...]."""
    prompt_length = per_position.shape[1] - response_length
    return per_position[:, prompt_length - 1 : -1]


def reference_log_probs(
    params, tokens: jax.Array, mask: jax.Array, *, model_config: LlamaConfig,
    temperature: float, response_length: int,
) -> jax.Array:
    """Returns log π(response token) [B, N], teacher-forced with the sampler's logit processing."""
    logprobs = sampling_lib.sequence_logprobs(
        model_config, params, tokens, mask, temperature=temperature
    )
    # sequence_logprobs scores token t at index t, so the response tokens are the last N.
    return logprobs[:, -response_length:]


def value_estimates(
    params, tokens: jax.Array, mask: jax.Array, *, model_config: LlamaConfig,
    response_length: int,
) -> jax.Array:
    """Returns V(s_t) [B, N] for the state before each response token."""
    per_position, _ = Llama(model_config, head="scalar").apply(
        {"params": params}, tokens, mask=mask.astype(bool)
    )
    return response_slice(per_position, response_length)


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of `ppo_train_step`.

    Attributes:
      temperature: the sampling temperature, applied to the logits as the sampler does.
      clip_eps: ε of the clipped policy loss.
      value_clip: the clipping range of the value loss.
      num_microbatches: the minibatch is split into this many parts whose gradients are
        accumulated before the single optimizer step (to bound activation memory).
    """

    temperature: float
    clip_eps: float
    value_clip: float
    num_microbatches: int = 1


def _policy_loss(params, batch, *, model_config: LlamaConfig, settings: UpdateSettings):
    """Clipped policy loss of one (micro)batch; aux = (token count, (sum, count) metrics)."""
    mask = batch["response_mask"].astype(bool)
    response_length = mask.shape[1]
    logits, _ = Llama(model_config, head="lm").apply(
        {"params": params}, batch["tokens"], mask=batch["mask"].astype(bool)
    )
    # [B, T, V] -> [B, N, V], the distributions the response tokens were drawn from.
    logits = response_slice(logits, response_length)
    targets = batch["tokens"][:, -response_length:]
    logp = sampling_lib.token_logprobs(logits, targets, settings.temperature)

    loss, metrics = losses.ppo_policy_loss(
        logp, batch["logp"], batch["advantages"], mask, settings.clip_eps
    )
    entropy = losses.entropy_from_logits(jax.lax.stop_gradient(logits), settings.temperature)
    log_ratio = jax.lax.stop_gradient(logp) - batch["logp"]
    count = jnp.sum(mask, dtype=jnp.float32)
    aux = {
        "policy_loss": loss,
        "policy_clip_fraction": metrics["clip_fraction"],
        "approx_kl": metrics["approx_kl"],
        "entropy": losses.masked_mean(entropy, mask),
    }
    log_ratio_max = jnp.max(jnp.where(mask, jnp.abs(log_ratio), 0.0))
    return loss, (count, aux, log_ratio_max)


def _value_loss(params, batch, *, model_config: LlamaConfig, settings: UpdateSettings):
    """Clipped value loss of one (micro)batch; aux as for `_policy_loss`."""
    mask = batch["response_mask"].astype(bool)
    values = value_estimates(
        params, batch["tokens"], batch["mask"], model_config=model_config,
        response_length=mask.shape[1],
    )
    loss, metrics = losses.value_loss(
        values, batch["values"], batch["returns"], mask, settings.value_clip
    )
    count = jnp.sum(mask, dtype=jnp.float32)
    aux = {"value_loss": loss, "value_clip_fraction": metrics["clip_fraction"]}
    return loss, (count, aux, jnp.zeros((), jnp.float32))


def _token_weighted_gradients(loss_fn, params, batch, num_microbatches: int):
    """Computes the gradient of the token-mean loss over `batch`, in microbatches.

    Each microbatch's loss is a mean over its real tokens, so its gradient is weighted by its
    share of the minibatch's real tokens: ∇L = Σ_i (n_i / n) ∇L_i with n_i its token count.

    Returns:
      (grads, metrics as (sum, count) pairs weighted by tokens, the maximum of the third aux).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    total = jnp.maximum(jnp.sum(batch["response_mask"], dtype=jnp.float32), 1.0)
    if num_microbatches == 1:
        (_, (count, aux, maximum)), grads = grad_fn(params, batch)
        return grads, {name: (value * count, count) for name, value in aux.items()}, maximum

    # [B, ...] -> [num_microbatches, B / num_microbatches, ...]
    micro = jax.tree.map(
        lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]),
        batch,
    )

    def accumulate(carry, microbatch):
        grads, sums, counts, maximum = carry
        (_, (count, aux, micro_maximum)), micro_grads = grad_fn(params, microbatch)
        grads = jax.tree.map(lambda g, m: g + m * (count / total), grads, micro_grads)
        sums = {name: sums[name] + aux[name] * count for name in sums}
        return (grads, sums, counts + count, jnp.maximum(maximum, micro_maximum)), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    # ((loss, (count, aux, maximum)), grads) of one microbatch, for the names in aux.
    (_, (_, aux_shape, _)), _ = jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))
    )
    zero_sums = {name: jnp.zeros((), jnp.float32) for name in aux_shape}
    init = (zero_grads, zero_sums, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, sums, counts, maximum), _ = jax.lax.scan(accumulate, init, micro)
    return grads, {name: (value, counts) for name, value in sums.items()}, maximum


def ppo_train_step(
    policy_state,
    value_state,
    batch: Mapping[str, jax.Array],
    *,
    policy_config: LlamaConfig,
    value_config: LlamaConfig,
    settings: UpdateSettings,
):
    """Takes one gradient step on the policy and one on the value model for one minibatch.

    Args:
      policy_state, value_state: `training.state.TrainState`s of the policy ("lm" head) and
        the value model ("scalar" head).
      batch: tokens [B, T] and mask [B, T] of prompt + response; response_mask, logp
        (behaviour log-probabilities), values (rollout values), advantages and returns [B, N].
      policy_config, value_config: the two models' shapes.
      settings: static hyperparameters.

    Returns:
      (policy_state, value_state, metrics, log_ratio_max): metrics are (sum, count) pairs for
      `training.metrics.reduce_metrics`; log_ratio_max is the largest |log π_θ - log π_old|
      over the minibatch's real tokens before the step. With unchanged parameters it measures
      how far the trainer's recomputation is from the sampler's log-probabilities.
    """
    policy_loss = functools.partial(_policy_loss, model_config=policy_config, settings=settings)
    value_loss = functools.partial(_value_loss, model_config=value_config, settings=settings)

    policy_grads, policy_metrics, log_ratio_max = _token_weighted_gradients(
        policy_loss, policy_state.params, batch, settings.num_microbatches
    )
    value_grads, value_metrics, _ = _token_weighted_gradients(
        value_loss, value_state.params, batch, settings.num_microbatches
    )
    policy_state, _ = policy_state.apply_gradients(policy_grads)
    value_state, _ = value_state.apply_gradients(value_grads)

    one = jnp.ones((), jnp.float32)
    metrics = {
        **policy_metrics,
        **value_metrics,
        "policy_grad_norm": (optax.tree.norm(policy_grads), one),
        "value_grad_norm": (optax.tree.norm(value_grads), one),
    }
    return policy_state, value_state, metrics, log_ratio_max


# ---------------------------------------------------------------------------------------------
# Rollouts and evaluation.


@dataclasses.dataclass
class _Models:
    """Everything that scores rollouts, fixed for the whole run."""

    policy_config: LlamaConfig
    value_config: LlamaConfig
    reference_params: Any
    helpfulness: Any  # reward_model.scoring.RewardModel
    safety: Any  # RewardModel or None
    sampler: sampling_lib.Sampler
    reference_fn: Any
    value_fn: Any


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the config field that has an invalid value."""
    rollout, ppo = config.rollout, config.ppo
    if rollout.batch_size <= 0 or rollout.batch_size % ppo.minibatch_size:
        raise ValueError(
            f"rollout.batch_size ({rollout.batch_size}) must be a positive multiple of "
            f"ppo.minibatch_size ({ppo.minibatch_size})."
        )
    if ppo.minibatch_size % ppo.num_microbatches:
        raise ValueError(
            f"ppo.minibatch_size ({ppo.minibatch_size}) must be a multiple of "
            f"ppo.num_microbatches ({ppo.num_microbatches})."
        )
    if not rollout.temperature > 0:
        raise ValueError(
            f"rollout.temperature must be > 0 (PPO needs a stochastic policy), got "
            f"{rollout.temperature}."
        )
    for name in ("max_prompt_length", "max_response_length", "sampling_batch_size"):
        if rollout[name] <= 0:
            raise ValueError(f"rollout.{name} must be positive, got {rollout[name]}.")
    if config.reward.kl_estimator not in PPO_KL_ESTIMATORS:
        raise ValueError(
            f"reward.kl_estimator must be one of {PPO_KL_ESTIMATORS}, got "
            f"{config.reward.kl_estimator!r}."
        )
    if config.reward.whitening not in WHITENING_MODES:
        raise ValueError(
            f"reward.whitening must be one of {WHITENING_MODES}, got {config.reward.whitening!r}."
        )
    if config.early_stopping.metric not in EARLY_STOPPING_METRICS:
        raise ValueError(
            f"early_stopping.metric must be one of {EARLY_STOPPING_METRICS}, got "
            f"{config.early_stopping.metric!r}."
        )
    for name in ("num_iterations", "eval_every", "checkpoint_every"):
        if config[name] <= 0:
            raise ValueError(f"{name} must be positive, got {config[name]}.")
    if ppo.epochs <= 0:
        raise ValueError(f"ppo.epochs must be positive, got {ppo.epochs}.")


def _sample_and_score(
    models: _Models,
    policy_params,
    value_params,
    prompt_ids: Sequence[Sequence[int]],
    is_safety_prompt: np.ndarray,
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    mesh,
    *,
    with_values: bool,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Samples one response per prompt and scores it with the reference and reward models.

    Returns:
      (arrays, seconds): host arrays tokens, mask [B, T], response_mask, logp, ref_logp,
      values (when `with_values`) [B, N], helpfulness_raw, safety_raw (absent without a safety
      model), is_safety_prompt, lengths [B]; and the seconds spent generating and scoring.
    """
    rollout = config.rollout
    pad_id = models.sampler.pad_id
    chunk = rollout.sampling_batch_size
    start = time.perf_counter()
    parts = []
    for chunk_index, offset in enumerate(range(0, len(prompt_ids), chunk)):
        tokens, mask = sampling_lib.left_pad(
            prompt_ids[offset : offset + chunk], pad_id, rollout.max_prompt_length
        )
        output = models.sampler.generate(
            tokens, mask, jax.random.fold_in(rng, chunk_index), params=policy_params
        )
        full_tokens, full_mask = output.full_sequences()
        parts.append(
            {
                "tokens": np.asarray(full_tokens),
                "mask": np.asarray(full_mask),
                "response_mask": np.asarray(output.response_mask),
                "logp": np.asarray(output.logprobs),
                "lengths": np.asarray(output.lengths),
            }
        )
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    generated = time.perf_counter()

    with jax.set_mesh(mesh):
        batch = {
            name: jax.device_put(arrays[name], shd.batch_sharding(mesh, arrays[name].shape))
            for name in ("tokens", "mask")
        }
        if rollout.recompute_logp:
            arrays["logp"] = np.asarray(models.reference_fn(policy_params, **batch))
        arrays["ref_logp"] = np.asarray(models.reference_fn(models.reference_params, **batch))
        if with_values:
            arrays["values"] = np.asarray(models.value_fn(value_params, **batch))
        arrays["helpfulness_raw"] = np.asarray(
            reward_scoring.score(models.helpfulness.config, models.helpfulness.params, **batch)
        )
        if models.safety is not None:
            arrays["safety_raw"] = np.asarray(
                reward_scoring.score(models.safety.config, models.safety.params, **batch)
            )
    arrays["is_safety_prompt"] = np.asarray(is_safety_prompt, bool)
    scored = time.perf_counter()
    return arrays, {"generation": generated - start, "scoring": scored - generated}


def _response_metrics(
    arrays: Mapping[str, np.ndarray], scores: GatedScores, reward: np.ndarray,
    kl: np.ndarray, eos_id: int,
) -> dict[str, float]:
    """Host means of the rewards, the KL and the response lengths of one batch."""
    response_mask = arrays["response_mask"]
    lengths = arrays["lengths"]
    last_tokens = arrays["tokens"][
        np.arange(len(lengths)), arrays["tokens"].shape[1] - response_mask.shape[1]
        + np.maximum(lengths - 1, 0)
    ]
    kl_per_response = np.sum(np.where(response_mask, kl, 0.0), axis=1)
    metrics = {
        "reward_helpfulness": float(np.mean(arrays["helpfulness_raw"])),
        "reward_gated": float(np.mean(scores.gated)),
        "reward_whitened": float(np.mean(reward)),
        "safety_gate_fraction": float(np.mean(scores.used_safety)),
        "kl": float(np.mean(kl_per_response)),
        "kl_per_token": float(np.sum(kl_per_response) / max(np.sum(response_mask), 1)),
        "response_length": float(np.mean(lengths)),
        "eos_fraction": float(np.mean(last_tokens == eos_id)),
    }
    if "safety_raw" in arrays:
        metrics["reward_safety"] = float(np.mean(arrays["safety_raw"]))
    return metrics


def _reward_model_statistics(model, name: str, directory) -> ScoreStatistics:
    """Reads a reward model's stored score mean and std, for whitening mode "metadata"."""
    try:
        mean, std = model.score_mean, model.score_std
    except KeyError as error:
        raise ValueError(
            f"The {name} reward model in {directory} stores no score statistics ({error}); "
            "export it with an evaluation set or set reward.whitening='running'."
        ) from error
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(
            f"The {name} reward model in {directory} stores score_mean={mean}, "
            f"score_std={std}; whitening needs a finite mean and a positive std."
        )
    return ScoreStatistics(mean, std)


def _copy_tree(tree):
    """Copies every array, so that donating one train state never frees another model's buffers."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@dataclasses.dataclass
class _RunState:
    """The host-side state of a run that checkpoints carry next to the two train states."""

    completed: int = 0
    running: RunningMoments = dataclasses.field(default_factory=RunningMoments)
    best_value: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False
    eval_history: list = dataclasses.field(default_factory=list)

    def to_extra(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {
            "iteration": self.completed,
            "seed": int(config.seed),
            "prompt_position": self.completed * int(config.rollout.batch_size),
            "running_stats": self.running.to_dict(),
            "best_value": self.best_value if math.isfinite(self.best_value) else None,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "stopped_early": self.stopped_early,
            "eval_history": self.eval_history,
        }

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], config: ml_collections.ConfigDict) -> _RunState:
        if int(extra.get("seed", config.seed)) != int(config.seed):
            raise ValueError(
                f"The checkpoint was written with seed {extra['seed']}, but the config has seed "
                f"{config.seed}; use the original seed or a new workdir."
            )
        best_value = extra.get("best_value")
        return cls(
            completed=int(extra["iteration"]),
            running=RunningMoments(**extra.get("running_stats", {})),
            best_value=-math.inf if best_value is None else float(best_value),
            best_step=int(extra.get("best_step", -1)),
            evals_since_best=int(extra.get("evals_since_best", 0)),
            stopped_early=bool(extra.get("stopped_early", False)),
            eval_history=list(extra.get("eval_history", [])),
        )


def _decode_responses(arrays: Mapping[str, np.ndarray], tokenizer) -> list[str]:
    """Decodes each response without its EOS."""
    response_length = arrays["response_mask"].shape[1]
    responses = arrays["tokens"][:, -response_length:]
    texts = []
    for row, length in zip(responses, arrays["lengths"], strict=True):
        ids = row[:length].tolist()
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


def _evaluate(
    models: _Models, policy_params, held_out: EncodedPrompts, num_eval: int, rng: jax.Array,
    config: ml_collections.ConfigDict, mesh, statistics, running: RunningMoments, tokenizer,
    eval_scorer=None,
) -> dict[str, float]:
    """Samples the held-out prompts with a fixed key and returns their mean rewards and KL,
    plus the metrics of `eval_scorer(prompts, response texts)` when given."""
    arrays, seconds = _sample_and_score(
        models, policy_params, None, held_out.ids[:num_eval],
        held_out.is_safety_prompt[:num_eval], rng, config, mesh, with_values=False,
    )
    scores = gate_scores(
        arrays["helpfulness_raw"], arrays.get("safety_raw"), arrays["is_safety_prompt"],
        config.reward.safety_threshold,
    )
    mean, std = whitening_statistics(
        config.reward.whitening, scores.used_safety, *statistics, running
    )
    reward = sequence_rewards(scores, mean, std)
    kl = np.asarray(
        losses.kl_estimate(arrays["logp"], arrays["ref_logp"], config.reward.kl_estimator)
    )
    metrics = _response_metrics(arrays, scores, reward, kl, tokenizer.eos_id)
    if eval_scorer is not None:
        texts = _decode_responses(arrays, tokenizer)
        metrics.update(eval_scorer(held_out.prompts[:num_eval], texts))
    metrics["seconds"] = seconds["generation"] + seconds["scoring"]
    return metrics


def _ppo_iteration(
    iteration: int,
    policy_state,
    value_state,
    models: _Models,
    train: EncodedPrompts,
    run: _RunState,
    config: ml_collections.ConfigDict,
    mesh,
    statistics,
    step_fn,
    advantages_fn,
    batch_shardings,
    rollout_rng: jax.Array,
    eos_id: int,
):
    """Runs one rollout, scoring and update; returns the new states and the `ppo/` metrics."""
    batch_size = config.rollout.batch_size
    indices = prompt_order(len(train), config.seed, iteration * batch_size, batch_size)
    arrays, seconds = _sample_and_score(
        models, policy_state.params, value_state.params, [train.ids[i] for i in indices],
        train.is_safety_prompt[indices], jax.random.fold_in(rollout_rng, iteration), config,
        mesh, with_values=True,
    )

    # Sequence rewards, per-token rewards and advantages.
    start = time.perf_counter()
    scores = gate_scores(
        arrays["helpfulness_raw"], arrays.get("safety_raw"), arrays["is_safety_prompt"],
        config.reward.safety_threshold,
    )
    if config.reward.whitening == "running":
        run.running.update(scores.logit_gated)
    mean, std = whitening_statistics(
        config.reward.whitening, scores.used_safety, *statistics, run.running
    )
    reward = sequence_rewards(scores, mean, std)
    targets = jax.device_get(
        advantages_fn(reward, arrays["logp"], arrays["ref_logp"], arrays["values"],
                      arrays["response_mask"])
    )
    arrays.update(targets)
    metrics = _response_metrics(arrays, scores, reward, targets["kl"], eos_id)
    metrics["reward_total"] = float(np.mean(np.sum(targets["rewards"], axis=1)))
    metrics["explained_variance"] = float(
        losses.explained_variance(arrays["values"], targets["returns"], arrays["response_mask"])
    )
    seconds["scoring"] += time.perf_counter() - start

    # Minibatch updates: one gradient step per minibatch.
    start = time.perf_counter()
    minibatch_size = config.ppo.minibatch_size
    names = ("tokens", "mask", "response_mask", "logp", "values", "advantages", "returns")
    step_metrics, log_ratio_maxima = [], []
    for epoch in range(config.ppo.epochs):
        order = np.random.default_rng([config.seed, iteration, epoch]).permutation(batch_size)
        for offset in range(0, batch_size, minibatch_size):
            rows = order[offset : offset + minibatch_size]
            minibatch = {name: arrays[name][rows] for name in names}
            with jax.set_mesh(mesh):
                minibatch = jax.device_put(minibatch, batch_shardings)
                policy_state, value_state, minibatch_metrics, log_ratio_max = step_fn(
                    policy_state, value_state, minibatch
                )
            step_metrics.append(minibatch_metrics)
            log_ratio_maxima.append(log_ratio_max)
    metrics.update(reduce_metrics(step_metrics))
    log_ratio_maxima = [float(value) for value in log_ratio_maxima]
    # Before the first step the parameters are those that sampled the batch.
    metrics["rollout_log_ratio_max"] = log_ratio_maxima[0]
    metrics["log_ratio_max"] = max(log_ratio_maxima)
    seconds["training"] = time.perf_counter() - start

    for name in ("policy_loss", "value_loss"):
        if not math.isfinite(metrics[name]):
            raise FloatingPointError(
                f"PPO iteration {iteration + 1}: {name} is {metrics[name]}; stopping."
            )
    metrics.update({f"time_{name}": value for name, value in seconds.items()})
    return policy_state, value_state, metrics


def _batch_shardings(mesh, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Returns the sharding of each minibatch array: rows over the `data` and `fsdp` axes."""
    rows = config.ppo.minibatch_size
    length = config.rollout.max_prompt_length + config.rollout.max_response_length
    response = config.rollout.max_response_length
    shapes = {
        "tokens": (rows, length),
        "mask": (rows, length),
        "response_mask": (rows, response),
        "logp": (rows, response),
        "values": (rows, response),
        "advantages": (rows, response),
        "returns": (rows, response),
    }
    return {name: shd.batch_sharding(mesh, shape) for name, shape in shapes.items()}


def _console_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    safety = metrics.get("reward_safety")
    safety_text = "" if safety is None else f" safety {safety:+.3f}"
    return (
        f"ppo {step}/{total} | reward gated {metrics['reward_gated']:.3f} whitened "
        f"{metrics['reward_whitened']:+.3f} helpfulness {metrics['reward_helpfulness']:+.3f}"
        f"{safety_text} | kl {metrics['kl']:.3f} | policy loss {metrics['policy_loss']:+.4f} "
        f"clip {metrics['policy_clip_fraction']:.3f} | value loss {metrics['value_loss']:.4f} "
        f"clip {metrics['value_clip_fraction']:.3f} ev {metrics['explained_variance']:+.2f} | "
        f"entropy {metrics['entropy']:.2f} length {metrics['response_length']:.1f} | "
        f"gen {metrics['time_generation']:.1f}s score {metrics['time_scoring']:.1f}s "
        f"train {metrics['time_training']:.1f}s"
    )


def run_ppo(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    policy_init: str,
    reward_models: Mapping[str, str | os.PathLike | None],
    train_prompts: Sequence[Prompt],
    eval_prompts: Sequence[Prompt],
    tokenizer,
    eval_scorer: Callable[[Sequence[Prompt], Sequence[str]], Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Trains a policy with PPO on the Llama 2 reward and exports it to `workdir/model`.

    Rerunning with the same workdir resumes from the latest checkpoint; a finished run only
    re-exports its model.

    Args:
      config: a `configs/ppo.py` config (the fields under rollout, reward, ppo, optimizer,
        value_optimizer, early_stopping and the loop fields are read here).
      workdir: the run's folder.
      policy_init: the initial policy and reference, anything
        `training.checkpoints.load_initial_params` accepts.
      reward_models: {"helpfulness": directory, "safety": directory or None} of reward models
        exported with head "scalar". The value model starts from the helpfulness model.
      train_prompts: prompts to sample rollouts from.
      eval_prompts: held-out prompts for evaluation and early stopping; the first
        `config.prompts.num_eval` are used.
      tokenizer: the policy's `data.tokenizer.Tokenizer`, shared by the reward models.
      eval_scorer: an optional independent judge: (held-out prompts, decoded responses) ->
        metrics, written under `eval/` with the reward-model metrics (the tiny variant
        passes the synthetic world's gold scorer).

    Returns:
      A dict with model_dir, iterations (completed), stopped_early, best_step, the held-out
      metrics of the initial, best and last evaluations, and eval_history (one dict per
      evaluation, with its step).
    """
    _check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(workdir, config)
    devices = jax.devices()[: config.num_devices] if config.num_devices else None
    mesh = shd.create_mesh(dict(config.mesh), devices)
    init_rng, rollout_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    prompt_length = config.rollout.max_prompt_length
    response_length = config.rollout.max_response_length

    # Prompts.
    train = encode_prompts(train_prompts, tokenizer, prompt_length, name="training")
    held_out = encode_prompts(eval_prompts, tokenizer, prompt_length, name="held-out")
    num_eval = min(config.prompts.num_eval, len(held_out))

    # Policy, reference and reward models.
    overrides = dict(config.model_overrides)
    unknown = sorted(set(overrides) - set(COMPUTE_OVERRIDES))
    if unknown:
        raise ValueError(f"model_overrides may only set {COMPUTE_OVERRIDES}, got {unknown}.")
    policy = load_initial_params(policy_init, head="lm", rng=init_rng, mesh=mesh,
                                 model_config_overrides=overrides or None)
    if reward_models.get("helpfulness") is None:
        raise ValueError("reward_models['helpfulness'] is required; it also initializes the value "
                         "model.")
    helpfulness = RewardModel.load(reward_models["helpfulness"], mesh=mesh,
                                   pad_id=tokenizer.pad_id)
    safety = None
    if reward_models.get("safety"):
        safety = RewardModel.load(reward_models["safety"], mesh=mesh, pad_id=tokenizer.pad_id)
    for name, model in (("policy", policy), ("helpfulness", helpfulness), ("safety", safety)):
        if model is not None and model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"The {name} model has {model.config.vocab_size} token ids, fewer than the "
                f"tokenizer {tokenizer.source} ({tokenizer.vocab_size}); every model must "
                "share the policy's tokenizer."
            )
    if safety is None and config.early_stopping.metric == "reward_safety":
        raise ValueError("early_stopping.metric is 'reward_safety' but there is no safety model.")
    statistics = (None, None)
    if config.reward.whitening == "metadata":
        statistics = (
            _reward_model_statistics(helpfulness, "helpfulness", reward_models["helpfulness"]),
            None if safety is None
            else _reward_model_statistics(safety, "safety", reward_models["safety"]),
        )
    sampling_config = sampling_lib.SamplingConfig(
        temperature=float(config.rollout.temperature), max_new_tokens=response_length
    )
    value_config = helpfulness.config.replace(**overrides)
    models = _Models(
        policy_config=policy.config,
        value_config=value_config,
        reference_params=policy.params,
        helpfulness=helpfulness,
        safety=safety,
        sampler=sampling_lib.Sampler(
            policy.config, None, sampling_config, tokenizer.eos_id, pad_id=tokenizer.pad_id,
            mesh=mesh,
        ),
        reference_fn=jax.jit(functools.partial(
            reference_log_probs, model_config=policy.config,
            temperature=float(config.rollout.temperature), response_length=response_length,
        )),
        value_fn=jax.jit(functools.partial(
            value_estimates, model_config=value_config, response_length=response_length,
        )),
    )

    # Train states, restored when the workdir has a checkpoint.
    steps_per_iteration = config.ppo.epochs * (config.rollout.batch_size
                                               // config.ppo.minibatch_size)
    total_steps = config.num_iterations * steps_per_iteration
    policy_tx, _ = make_optimizer(config.optimizer, total_steps)
    value_tx, _ = make_optimizer(config.value_optimizer, total_steps)
    policy_abstract, policy_shardings = train_state_shardings(policy.config, "lm", policy_tx, mesh)
    value_abstract, value_shardings = train_state_shardings(value_config, "scalar", value_tx, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints")
    best_checkpointer = Checkpointer(workdir / "best_policy", max_to_keep=1)
    if checkpointer.latest_step() is not None:
        restored, extra = checkpointer.restore({"policy": policy_abstract, "value": value_abstract})
        policy_state, value_state = restored["policy"], restored["value"]
        run = _RunState.from_extra(extra, config)
        if run.completed <= 0:
            raise ValueError(f"Checkpoint in {workdir / 'checkpoints'} has iteration "
                             f"{run.completed}; expected a positive iteration.")
        logger.info("Resuming PPO from iteration %d in %s.", run.completed, workdir)
    else:
        policy_state, _ = create_train_state(
            policy.config, "lm", policy_tx, mesh, init_rng, params=_copy_tree(policy.params)
        )
        value_state, _ = create_train_state(
            value_config, "scalar", value_tx, mesh, init_rng, params=_copy_tree(helpfulness.params)
        )
        run = _RunState()

    settings = UpdateSettings(
        temperature=float(config.rollout.temperature),
        clip_eps=float(config.ppo.clip_eps),
        value_clip=float(config.ppo.value_clip),
        num_microbatches=int(config.ppo.num_microbatches),
    )
    step_fn = jax.jit(
        functools.partial(ppo_train_step, policy_config=policy.config,
                          value_config=value_config, settings=settings),
        in_shardings=(policy_shardings, value_shardings, _batch_shardings(mesh, config)),
        out_shardings=(policy_shardings, value_shardings, shd.replicated(mesh),
                       shd.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    advantages_fn = jax.jit(functools.partial(
        compute_advantages, beta=float(config.reward.beta),
        kl_estimator=config.reward.kl_estimator, gamma=float(config.ppo.gamma),
        lam=float(config.ppo.lam), whiten_advantages=bool(config.ppo.whiten_advantages),
    ))

    def evaluate_and_track(step: int) -> None:
        """Evaluates the current policy at `step` and updates the early-stopping state."""
        metrics = _evaluate(models, policy_state.params, held_out, num_eval, eval_rng, config,
                            mesh, statistics, run.running, tokenizer, eval_scorer)
        writer.write_scalars(step, {f"eval/{name}": value for name, value in metrics.items()})
        run.eval_history.append({"step": step, **metrics})
        value = metrics[config.early_stopping.metric]
        if value > run.best_value + config.early_stopping.min_delta or run.best_step < 0:
            run.best_value, run.best_step, run.evals_since_best = value, step, 0
            # A rerun after a crash repeats the evaluations made after the last checkpoint. Their
            # policies are identical, so an existing best checkpoint of this step is kept.
            if step not in best_checkpointer.all_steps():
                best_checkpointer.save(step, policy_state.params, {"value": value})
        else:
            run.evals_since_best += 1
            if run.evals_since_best >= config.early_stopping.patience:
                run.stopped_early = True
        extra = "".join(f" | {name} {metrics[name]:.4f}" for name in ("gold", "unsafe_fraction")
                        if name in metrics)
        logger.info(
            "eval %d | held-out reward gated %.4f whitened %+.4f | kl %.3f | length %.1f%s | "
            "best %s %.4f at %d%s", step, metrics["reward_gated"], metrics["reward_whitened"],
            metrics["kl"], metrics["response_length"], extra, config.early_stopping.metric,
            run.best_value, run.best_step, " | stopping early" if run.stopped_early else "",
        )

    resumed = run.completed > 0
    writer = MetricWriter(workdir, purge_step=run.completed + 1 if resumed else 0)
    try:
        if not resumed:
            evaluate_and_track(0)
        batch_shardings = _batch_shardings(mesh, config)
        while run.completed < config.num_iterations and not run.stopped_early:
            iteration = run.completed
            policy_state, value_state, metrics = _ppo_iteration(
                iteration, policy_state, value_state, models, train, run, config, mesh,
                statistics, step_fn, advantages_fn, batch_shardings, rollout_rng,
                tokenizer.eos_id,
            )
            run.completed = iteration + 1
            writer.write_scalars(run.completed,
                                 {f"ppo/{name}": value for name, value in metrics.items()})
            logger.info(_console_line(run.completed, config.num_iterations, metrics))
            is_last = run.completed == config.num_iterations
            if run.completed % config.eval_every == 0 or is_last:
                evaluate_and_track(run.completed)
            if run.completed % config.checkpoint_every == 0 or is_last or run.stopped_early:
                checkpointer.save(run.completed, {"policy": policy_state, "value": value_state},
                                  run.to_extra(config))
            writer.flush()
        checkpointer.wait()
        best_checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
        best_checkpointer.close()

    # Export the policy of the best held-out evaluation.
    with Checkpointer(workdir / "best_policy", max_to_keep=1) as best:
        best_params, best_extra = best.restore(policy_abstract.params, step=run.best_step)
    model_dir = save_model(
        workdir / "model", policy.config, best_params, head="lm",
        metadata={
            "stage": "ppo",
            "init_from": str(policy_init),
            "reward_models": {name: None if path is None else str(path)
                              for name, path in reward_models.items()},
            "iteration": run.best_step,
            f"eval_{config.early_stopping.metric}": best_extra.get("value"),
        },
    )
    history = run.eval_history
    return {
        "model_dir": str(model_dir),
        "iterations": run.completed,
        "stopped_early": run.stopped_early,
        "best_step": run.best_step,
        "initial_eval": history[0] if history else None,
        "best_eval": next((h for h in history if h["step"] == run.best_step), None),
        "final_eval": history[-1] if history else None,
        "eval_history": history,
    }


# ---------------------------------------------------------------------------------------------
# Entry point.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Runs PPO as configured by `configs/ppo.py`; see `run_ppo` for the result.

    With `config.synthetic.enabled` (the tiny variant) the tokenizer, initial policy, reward
    models and prompts come from `synthetic.build_synthetic_setup` under `workdir/setup`;
    otherwise from the paths in the config.
    """
    workdir = pathlib.Path(workdir).absolute()
    if config.synthetic.enabled:
        from llama_rlhf import synthetic

        setup = synthetic.build_synthetic_setup(config.synthetic, workdir / "setup",
                                                seed=config.seed)
        tokenizer = setup.tokenizer
        policy_init = setup.policy_dir
        reward_models = {"helpfulness": setup.helpfulness_dir, "safety": setup.safety_dir}
        train_prompts, eval_prompts = setup.train_prompts, setup.eval_prompts
        eval_scorer = setup.gold_metrics
    else:
        for field in ("policy_init", "tokenizer", "reward_models.helpfulness", "prompts.train",
                      "prompts.eval"):
            value = config
            for part in field.split("."):
                value = value[part]
            if not value:
                raise ValueError(f"config.{field} is empty; the {config.variant} variant needs it.")
        tokenizer = load_tokenizer(config.tokenizer)
        policy_init = config.policy_init
        reward_models = {
            "helpfulness": config.reward_models.helpfulness,
            "safety": config.reward_models.safety or None,
        }
        train_prompts = read_prompts_jsonl(config.prompts.train)
        eval_prompts = read_prompts_jsonl(config.prompts.eval)
        eval_scorer = None
    return run_ppo(
        config, workdir, policy_init=str(policy_init), reward_models=reward_models,
        train_prompts=train_prompts, eval_prompts=eval_prompts, tokenizer=tokenizer,
        eval_scorer=eval_scorer,
    )
