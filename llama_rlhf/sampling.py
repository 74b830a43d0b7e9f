"""Batched autoregressive sampling from a Llama policy with a KV cache, and the matching scorer.

`Sampler.generate` takes left-padded prompts and runs the whole decode loop on the device. One
prefill forward writes the prompt into a `KVCache`. Then a `jax.lax.while_loop` feeds one token
at a time until every sequence has produced a stop token or `max_new_tokens` tokens. It
supports greedy decoding, temperature, top-k and top-p (nucleus) sampling, several samples per
prompt, and returns the log-probability of every sampled token.

Log-probabilities are those of the distribution actually sampled from: the logits are divided by
the temperature, then filtered by top-k and top-p, then normalized. `process_logits` is the one
implementation of that processing. The sampler and `sequence_logprobs`, the teacher-forced scorer
that trainers use to recompute the same quantity, both call it, so a PPO ratio computed with
unchanged parameters is 1 up to float rounding.

Greedy decoding (`greedy=True` or `temperature=0`) takes the argmax of the raw logits. Its
distribution is a point mass, so its reported log-probabilities are those of the temperature-1
distribution with the same top-k and top-p filtering; `sequence_logprobs` with temperature 0
uses the same convention.

Compilation: prompt lengths and numbers of new tokens are rounded up to a small set of buckets
(powers of two by default), and `max_new_tokens` is a run-time argument of the compiled loop, so
batches whose shapes fall into the same buckets reuse one compiled program. Parameters are an
argument of the compiled function, never a constant, so a trainer can pass updated parameters
without recompiling. Samplers with equal configurations share compiled programs. Each new
compilation is logged and counted in `Sampler.num_compilations`. Every batch size still
compiles separately.

Randomness: the key of the token drawn at step i for output row r is
`fold_in(fold_in(rng, i), r)`. A row's samples therefore depend on the seed, its prompt and its
row index, but not on the batch padding or the device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_rlhf import sharding as shd
from llama_rlhf.data import batching
from llama_rlhf.model.config import LlamaConfig
from llama_rlhf.model.llama import KVCache, Llama
from llama_rlhf.model.params import param_shardings

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to draw tokens from the policy.

    Attributes:
      temperature: the logits are divided by it before sampling; 0 means greedy decoding.
      top_k: keep only the k most likely tokens (ties with the k-th are kept too); None or 0
        keeps all.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (computed after top-k); 1.0 keeps all.
      max_new_tokens: the maximum number of generated tokens per sequence, stop token included.
      num_samples: independent samples drawn for each prompt.
      stop_ids: token ids that end a sequence in addition to the sampler's EOS id.
      greedy: take the argmax of the logits instead of sampling (same as temperature 0).
      return_plain_logprobs: also return log-probabilities under the unfiltered distribution
        at temperature 1.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 128
    num_samples: int = 1
    stop_ids: tuple[int, ...] = ()
    greedy: bool = False
    return_plain_logprobs: bool = False

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"SamplingConfig.temperature must be a finite number >= 0, got {self.temperature}."
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(
                f"SamplingConfig.top_k must be None or an integer >= 0, got {self.top_k!r}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError("SamplingConfig.max_new_tokens must be a positive integer, got "
                             f"{self.max_new_tokens!r}.")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(
                f"SamplingConfig.num_samples must be a positive integer, got {self.num_samples!r}."
            )
        # Lists from configs or JSON become a hashable tuple.
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    def replace(self, **changes: Any) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class SampleOutput:
    """Generated sequences; rows are ordered prompt-major (row b * num_samples + j).

    Attributes:
      prompt_tokens: [B*n, T] the prompts as given (left-padded), each repeated num_samples
        times.
      prompt_mask: [B*n, T] True for real prompt tokens.
      tokens: [B*n, N] generated ids, `pad_id` after the stop token.
      lengths: [B*n] number of generated tokens, stop token included.
      logprobs: [B*n, N] log-probability of each generated token under the distribution it was
        sampled from; 0 on padding.
      response_mask: [B*n, N] True for generated tokens, stop token included.
      plain_logprobs: [B*n, N] log-probabilities under the unfiltered temperature-1
        distribution, or None unless `return_plain_logprobs` is set.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    response_mask: jax.Array
    plain_logprobs: jax.Array | None = None

    def full_sequences(self) -> tuple[jax.Array, jax.Array]:
        """Returns (tokens, mask) [B*n, T + N] of each prompt followed by its response."""
        tokens = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
        mask = jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)
        return tokens, mask


def process_logits(logits: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0) -> jax.Array:
    """Applies temperature, then top-k, then top-p filtering to logits [..., V].

    The result is z / T where the token is kept and -inf where it is filtered out, so
    `log_softmax` of it is the log-distribution that is sampled from. A temperature of 0
    (greedy decoding) is treated as 1.

    Top-k keeps tokens whose logit is >= the k-th largest. Top-p sorts the remaining tokens by
    probability p_(1) >= p_(2) >= ... and keeps token (i) while sum_{j<i} p_(j) < top_p, so the
    most likely token is always kept; tokens tied with the last kept one are kept too. The
    probability sums are float32, so a token whose preceding mass is within rounding of top_p
    may fall on either side.
    """
    logits = logits.astype(jnp.float32)
    if temperature not in (0.0, 1.0):
        logits = logits / jnp.float32(temperature)
    vocab_size = logits.shape[-1]
    if top_k and top_k < vocab_size:
        # The minimum of the top k rather than its last column: XLA on CPU turns a top-k whose
        # last column is sliced off into a full sort, about 80 times slower at V = 32000.
        kth_largest = jnp.min(jax.lax.top_k(logits, top_k)[0], axis=-1, keepdims=True)
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        logits = jnp.where(logits < _top_p_threshold(logits, top_p), -jnp.inf, logits)
    return logits


def _ordered_int(x: jax.Array) -> jax.Array:
    """Maps float32 to int32 so that the integer order is the float order (-inf included)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


def _top_p_threshold(logits: jax.Array, top_p: float) -> jax.Array:
    """Returns the smallest logit [..., 1] that nucleus (top-p) filtering keeps.

    A token with logit z is kept when the probability mass of the tokens with a larger logit,
    g(z) = sum_{j: z_j > z} p_j, is < top_p, which is the sorted-order rule of
    `process_logits` with ties kept. g decreases with z, so the kept tokens are those at or above
    a threshold, found by bisection over the 2^32 float32 values in 32 masked sums over the
    vocabulary. Sorting the vocabulary instead costs about ten times more on CPU at V = 32000.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _ordered_int(logits)
    # Invariants: g(high) < top_p (g of the maximum is 0) and g(low) >= top_p (low is below
    # every logit, so g(low) is the whole mass); the threshold is the smallest key > low with
    # g < top_p, so the loop ends with high equal to it.
    high = jnp.max(keys, axis=-1, keepdims=True)
    low = jnp.full_like(high, jnp.iinfo(jnp.int32).min)

    def halve(_, bounds):
        low, high = bounds
        # floor((low + high) / 2) without int32 overflow.
        middle = (low >> 1) + (high >> 1) + (low & high & 1)
        mass_above = jnp.sum(jnp.where(keys > middle, probs, 0.0), axis=-1, keepdims=True)
        below_top_p = mass_above < top_p
        return jnp.where(below_top_p, low, middle), jnp.where(below_top_p, middle, high)

    _, high = jax.lax.fori_loop(0, 32, halve, (low, high))
    return jnp.min(jnp.where(keys >= high, logits, jnp.inf), axis=-1, keepdims=True)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float = 1.0) -> jax.Array:
    """Returns log p(target) under `process_logits` ([..., V], [...] -> [...]).

    log p(y) = (z_y / T) - logsumexp_{v kept}(z_v / T) for a kept token y, -inf otherwise.
    """
    log_probs = jax.nn.log_softmax(process_logits(logits, temperature, top_k, top_p), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logprobs(model_config: LlamaConfig, params, tokens: jax.Array, mask: jax.Array, *,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                      return_plain: bool = False):
    """Scores whole sequences with one teacher-forced forward pass.

    Args:
      model_config: the policy's shape.
      params: the policy's parameters (an "lm" head).
      tokens: [B, T] token ids, real tokens contiguous (left padding before, right padding
        after).
      mask: [B, T] True for real tokens.
      temperature, top_k, top_p: the logit processing of `process_logits`, the same values the
        sampler used (`SamplingConfig` fields; temperature 0 means 1, as for greedy decoding).
      return_plain: also return the log-probabilities at temperature 1 without filtering.

    Returns:
      logprobs [B, T] where entry t is log p(tokens[t] | tokens[<t]) for every real token whose
      predecessor is real, and 0 elsewhere (the first real token, padding). A token that the
      filters exclude scores -inf. With top-k or top-p, a token sampled under older parameters
      can fall outside the set that newer parameters allow. With return_plain, a pair
      (logprobs, plain_logprobs).
    """
    mask = mask.astype(bool)
    logits, _ = Llama(model_config, head="lm").apply({"params": params}, tokens, mask=mask)
    # logits[:, t] predicts tokens[:, t + 1].
    logits, targets = logits[:, :-1], tokens[:, 1:]
    scored = mask[:, 1:] & mask[:, :-1]
    first_column = jnp.zeros((tokens.shape[0], 1), jnp.float32)

    def align(values):
        return jnp.concatenate([first_column, jnp.where(scored, values, 0.0)], axis=1)

    logprobs = align(token_logprobs(logits, targets, temperature, top_k, top_p))
    if not return_plain:
        return logprobs
    return logprobs, align(token_logprobs(logits, targets))


def response_logprobs(model_config: LlamaConfig, params, output: SampleOutput,
                      sampling: SamplingConfig, return_plain: bool = False):
    """Recomputes `output.logprobs` ([B*n, N]) by teacher forcing over prompt and response.

    With unchanged parameters the result equals `output.logprobs` up to float rounding; a
    trainer calls it with updated parameters to get the new policy's log-probabilities.
    """
    tokens, mask = output.full_sequences()
    result = sequence_logprobs(
        model_config, params, tokens, mask, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, return_plain=return_plain)
    prompt_length = output.prompt_tokens.shape[1]
    if return_plain:
        return tuple(values[:, prompt_length:] for values in result)
    return result[:, prompt_length:]


def _first_argmax(x: jax.Array) -> jax.Array:
    """Returns the first index of the maximum along the last axis, as int32.

    Same result as `jnp.argmax` for inputs without NaN; two plain reductions are about four times
    faster than argmax's variadic reduction on CPU at V = 32000.
    """
    maximum = jnp.max(x, axis=-1, keepdims=True)
    indices = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == maximum, indices, x.shape[-1]), axis=-1)


def sample_from_logits(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig):
    """Draws one token per row from logits [B, V] with per-row keys [B].

    Returns:
      (tokens [B] int32, logprobs [B], plain_logprobs [B] or None) where logprobs are under the
      processed distribution (see `process_logits`) and plain_logprobs under the raw logits.
    """
    processed = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    if sampling.is_greedy:
        tokens = _first_argmax(logits)
    else:
        # Gumbel-max sampling: argmax(z + Gumbel noise) is distributed as softmax(z). Filtered
        # tokens are -inf and never drawn.
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
        tokens = _first_argmax(processed + noise)
    log_probs = jax.nn.log_softmax(processed, axis=-1)
    logprobs = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    plain = None
    if sampling.return_plain_logprobs:
        plain_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        plain = jnp.take_along_axis(plain_log_probs, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs, plain


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Returns the smallest bucket >= length; past the largest, the next multiple of it."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    largest = buckets[-1]
    return -(-length // largest) * largest


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pads token lists to a common length with `data.batching.left_pad`.

    Returns:
      (tokens [B, length] int32, mask [B, length] bool) numpy arrays; length defaults to the
      longest prompt.
    """
    longest = max((len(p) for p in prompts), default=0)
    batch = batching.left_pad(prompts, longest if length is None else length, pad_id)
    return batch["tokens"], batch["mask"]


def _lm_logits(model_config: LlamaConfig, params, hidden: jax.Array) -> jax.Array:
    """Projects final hidden states [B, D] to logits [B, V] in float32, as Llama's "lm" head."""
    dtype = model_config.jnp_dtype
    if model_config.tie_word_embeddings:
        logits = jnp.einsum("bd,vd->bv", hidden, params["embed"].astype(dtype))
    else:
        logits = hidden @ params["lm_head"].astype(dtype)
    logits = shd.constrain(logits, (shd.BATCH, shd.ACT_VOCAB))
    return logits.astype(jnp.float32)


def _constrain_cache(cache: KVCache) -> KVCache:
    axes = KVCache.logical_axes()
    return jax.tree.map(
        shd.constrain, cache, axes,
        is_leaf=lambda node: isinstance(node, tuple) and all(
            isinstance(item, (str, type(None))) for item in node))


def _repeat_rows(cache: KVCache, repeats: int) -> KVCache:
    """Repeats every batch row of the cache `repeats` times, row-major."""
    return KVCache(
        keys=jnp.repeat(cache.keys, repeats, axis=1),
        values=jnp.repeat(cache.values, repeats, axis=1),
        mask=jnp.repeat(cache.mask, repeats, axis=0),
        index=cache.index,
    )


class Sampler:
    """Compiled batched generation for one policy shape and one sampling configuration.

    Args:
      model_config: the policy's shape.
      params: the policy's parameters, or a function returning them (called at each
        `generate`), for callers whose parameters change between calls.
      sampling: how to draw tokens.
      eos_id: the end-of-sequence id that stops a sequence; None disables it, leaving only
        `sampling.stop_ids`.
      pad_id: the id written after a sequence has stopped and used to pad prompts; by default
        `eos_id`, or 0 without one.
      mesh: a (data, fsdp, tensor) mesh. With one, parameters are placed by the rules table,
        the batch is split over `data` and `fsdp`, and the batch is padded to a multiple of
        their size.
      prompt_buckets, new_token_buckets: increasing lengths that prompt lengths and
        max_new_tokens are rounded up to.
    """

    def __init__(self, model_config: LlamaConfig, params: Any | Callable[[], Any],
                 sampling: SamplingConfig, eos_id: int | None, *, pad_id: int | None = None,
                 mesh: Mesh | None = None,
                 prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
                 new_token_buckets: Sequence[int] = DEFAULT_BUCKETS):
        for name, buckets in (("prompt_buckets", prompt_buckets),
                              ("new_token_buckets", new_token_buckets)):
            if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise ValueError(
                    f"Sampler {name} must be increasing positive lengths, got {buckets}.")
        stop_ids = tuple(sampling.stop_ids) + (() if eos_id is None else (int(eos_id),))
        for token in stop_ids + (() if pad_id is None else (pad_id,)):
            if not 0 <= token < model_config.vocab_size:
                raise ValueError(
                    f"Token id {token} (EOS, stop or pad id) is outside the vocabulary "
                    f"[0, {model_config.vocab_size}).")
        self.model_config = model_config
        self.sampling = sampling
        self.eos_id = eos_id
        if pad_id is None:
            pad_id = 0 if eos_id is None else eos_id
        self.pad_id = pad_id
        self.mesh = mesh
        self.prompt_buckets = tuple(prompt_buckets)
        self.new_token_buckets = tuple(new_token_buckets)
        self._params = params
        self._stop_ids = tuple(sorted(set(stop_ids)))
        self._num_compilations = 0
        self._param_shardings = None if mesh is None else param_shardings(model_config, mesh)

    @property
    def num_compilations(self) -> int:
        """The number of programs this sampler's calls compiled.

        Samplers with equal model config, sampling config, stop ids and pad id share compiled
        programs, so a call that reuses another sampler's program does not count.
        """
        return self._num_compilations

    def generate(self, prompt_tokens, prompt_mask, rng: jax.Array, *, params: Any = None,
                 max_new_tokens: int | None = None) -> SampleOutput:
        """Generates `num_samples` continuations of each left-padded prompt.

        Args:
          prompt_tokens: int [B, T] prompts, left-padded.
          prompt_mask: bool [B, T] True for real tokens; each row must be some False entries
            followed by at least one True entry.
          rng: a JAX PRNG key; the same key gives the same samples.
          params: parameters for this call, overriding those given at construction.
          max_new_tokens: overrides `sampling.max_new_tokens` for this call.

        Returns:
          A `SampleOutput` with B * num_samples rows and max_new_tokens generated columns.
        """
        tokens, mask = self._validate_prompts(prompt_tokens, prompt_mask)
        batch_size, prompt_length = tokens.shape
        max_new = self.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new, (int, np.integer)) or max_new < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}.")
        longest_prompt = int(mask.sum(axis=1).max())
        if longest_prompt + max_new > self.model_config.max_seq_len:
            raise ValueError(
                f"A prompt of {longest_prompt} tokens plus {max_new} new tokens exceeds the "
                f"model's max_seq_len of {self.model_config.max_seq_len}.")

        # Round the prompt up to its bucket with extra left padding, and the batch up to a
        # multiple of the number of batch shards with empty rows.
        prompt_bucket = bucket_length(prompt_length, self.prompt_buckets)
        new_bucket = bucket_length(max_new, self.new_token_buckets)
        padded_batch = -(-batch_size // self._batch_shards()) * self._batch_shards()
        padded_tokens = np.full((padded_batch, prompt_bucket), self.pad_id, np.int32)
        padded_mask = np.zeros((padded_batch, prompt_bucket), bool)
        padded_tokens[:batch_size, prompt_bucket - prompt_length:] = tokens
        padded_mask[:batch_size, prompt_bucket - prompt_length:] = mask
        # An empty row would attend to nothing; give padding rows one real token.
        padded_mask[batch_size:, -1] = True

        params = self._resolve_params(params)
        static = dict(model_config=self.model_config, sampling=self.sampling,
                      stop_ids=self._stop_ids, pad_id=self.pad_id, new_bucket=new_bucket)
        cache_size = _generate_padded._cache_size()
        start = time.perf_counter()
        if self.mesh is None:
            result = _generate_padded(params, padded_tokens, padded_mask, rng, np.int32(max_new),
                                      **static)
        else:
            params = jax.device_put(params, self._param_shardings)
            padded_tokens = jax.device_put(
                padded_tokens, shd.batch_sharding(self.mesh, padded_tokens.shape))
            padded_mask = jax.device_put(
                padded_mask, shd.batch_sharding(self.mesh, padded_mask.shape))
            with jax.set_mesh(self.mesh):
                result = _generate_padded(params, padded_tokens, padded_mask, rng,
                                          np.int32(max_new), **static)
        if _generate_padded._cache_size() > cache_size:
            # The time includes the compilation and, unless dispatch is asynchronous, the run.
            self._num_compilations += 1
            logger.info(
                "Compiled the sampler for batch %d, prompt bucket %d, new-token bucket %d in "
                "%.1f s (compilation %d of this sampler).", padded_batch, prompt_bucket,
                new_bucket, time.perf_counter() - start, self._num_compilations)

        rows = batch_size * self.sampling.num_samples
        generated, logprobs, plain, response_mask = (
            None if value is None else value[:rows, :max_new] for value in result)
        repeats = self.sampling.num_samples
        return SampleOutput(
            prompt_tokens=jnp.asarray(np.repeat(tokens, repeats, axis=0)),
            prompt_mask=jnp.asarray(np.repeat(mask, repeats, axis=0)),
            tokens=generated,
            lengths=jnp.sum(response_mask, axis=1, dtype=jnp.int32),
            logprobs=logprobs,
            response_mask=response_mask,
            plain_logprobs=plain,
        )

    def generate_ids(self, prompts: Sequence[Sequence[int]], rng: jax.Array, *, params: Any = None,
                     max_new_tokens: int | None = None) -> list[list[list[int]]]:
        """Generates from prompts given as token lists.

        Returns:
          For each prompt, num_samples lists of generated ids, each ending with its stop token
          when one was generated.
        """
        if not prompts:
            raise ValueError("generate_ids needs at least one prompt.")
        tokens, mask = left_pad(prompts, self.pad_id)
        output = self.generate(tokens, mask, rng, params=params, max_new_tokens=max_new_tokens)
        generated = np.asarray(output.tokens)
        lengths = np.asarray(output.lengths)
        n = self.sampling.num_samples
        return [[generated[b * n + j, :lengths[b * n + j]].tolist() for j in range(n)]
                for b in range(len(prompts))]

    def generate_text(self, tokenizer, prompts: Sequence[str], rng: jax.Array, *,
                      params: Any = None, max_new_tokens: int | None = None) -> list[list[str]]:
        """Encodes prompts (with BOS), generates, and decodes each sample without its stop token.

        `tokenizer` needs `encode(text, bos, eos) -> list[int]` and `decode(ids) -> str`.
        """
        encoded = [tokenizer.encode(text, bos=True, eos=False) for text in prompts]
        samples = self.generate_ids(encoded, rng, params=params, max_new_tokens=max_new_tokens)
        stops = set(self._stop_ids)
        return [[tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids)
                 for ids in per_prompt] for per_prompt in samples]

    def _resolve_params(self, params):
        if params is None:
            params = self._params() if callable(self._params) else self._params
        if params is None:
            raise ValueError("Sampler has no parameters: pass params to the constructor or to "
                             "generate().")
        return params

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return int(self.mesh.shape.get(shd.DATA, 1)) * int(self.mesh.shape.get(shd.FSDP, 1))

    def _validate_prompts(self, prompt_tokens, prompt_mask):
        tokens = np.asarray(prompt_tokens)
        mask = np.asarray(prompt_mask)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"prompt_tokens must have shape [batch, length] with both > 0, "
                             f"got {tokens.shape}.")
        if mask.shape != tokens.shape:
            raise ValueError(f"prompt_mask has shape {mask.shape}, expected {tokens.shape} like "
                             "prompt_tokens.")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompt_tokens must be integer token ids, got dtype {tokens.dtype}.")
        mask = mask.astype(bool)
        vocab_size = self.model_config.vocab_size
        outside = mask & ((tokens < 0) | (tokens >= vocab_size))
        if outside.any():
            row, column = np.argwhere(outside)[0]
            raise ValueError(f"prompt_tokens[{row}, {column}] = {tokens[row, column]} is outside "
                             f"the vocabulary [0, {vocab_size}).")
        empty = ~mask.any(axis=1)
        if empty.any():
            raise ValueError(f"Prompt row {int(np.argmax(empty))} has no real tokens.")
        # Left padding: once a row's mask turns True it stays True.
        not_left_padded = (np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1)
        if not_left_padded.any():
            raise ValueError(f"Prompt row {int(np.argmax(not_left_padded))} is not left-padded: "
                             "its mask has False entries after True ones.")
        tokens = np.where(mask, tokens, self.pad_id).astype(np.int32)
        return tokens, mask


@functools.partial(jax.jit, static_argnames=(
    "model_config", "sampling", "stop_ids", "pad_id", "new_bucket"))
def _generate_padded(params, tokens, mask, rng, max_new_tokens, *, model_config: LlamaConfig,
                     sampling: SamplingConfig, stop_ids: tuple[int, ...], pad_id: int,
                     new_bucket: int):
    """Runs the compiled body of `Sampler.generate` (prefill, then decode) on padded shapes.

    Returns:
      (tokens, logprobs, plain_logprobs or None, response_mask), each [rows, new_bucket] with
      rows = batch * num_samples.
    """
    model = Llama(model_config, head="none")
    batch_size, prompt_bucket = tokens.shape
    n = sampling.num_samples
    rows = batch_size * n
    stop_array = jnp.asarray(stop_ids, jnp.int32)
    row_ids = jnp.arange(rows, dtype=jnp.uint32)

    def is_stop(token):
        if not stop_ids:
            return jnp.zeros(token.shape, bool)
        return jnp.any(token[:, None] == stop_array[None, :], axis=-1)

    def draw(logits, step):
        step_key = jax.random.fold_in(rng, step)
        keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(row_ids)
        return sample_from_logits(logits, keys, sampling)

    # Prefill each prompt once, then copy its cache for the num_samples samples.
    cache = _constrain_cache(KVCache.create(model_config, batch_size, prompt_bucket + new_bucket))
    hidden, cache = model.apply({"params": params}, tokens, mask=mask, cache=cache)
    # The last column is a real token in every left-padded row.
    logits = _lm_logits(model_config, params, hidden[:, -1])
    if n > 1:
        cache = _repeat_rows(cache, n)
        logits = jnp.repeat(logits, n, axis=0)
    cache = _constrain_cache(cache)

    token, logprob, plain = draw(logits, 0)
    out_tokens = jnp.full((rows, new_bucket), pad_id, jnp.int32).at[:, 0].set(token)
    out_logprobs = jnp.zeros((rows, new_bucket), jnp.float32).at[:, 0].set(logprob)
    out_plain = None
    if plain is not None:
        out_plain = jnp.zeros((rows, new_bucket), jnp.float32).at[:, 0].set(plain)
    out_mask = jnp.zeros((rows, new_bucket), bool).at[:, 0].set(True)
    done = is_stop(token)
    state = (jnp.int32(1), cache, token, done, out_tokens, out_logprobs, out_plain, out_mask)

    def keep_going(state):
        step, done = state[0], state[3]
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(state):
        step, cache, previous, done, out_tokens, out_logprobs, out_plain, out_mask = state
        hidden, cache = model.apply({"params": params}, previous[:, None], cache=cache)
        logits = _lm_logits(model_config, params, hidden[:, 0])
        token, logprob, plain = draw(logits, step)
        active = ~done
        token = jnp.where(active, token, pad_id)
        out_tokens = out_tokens.at[:, step].set(token)
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
        if plain is not None:
            out_plain = out_plain.at[:, step].set(jnp.where(active, plain, 0.0))
        out_mask = out_mask.at[:, step].set(active)
        done = done | (active & is_stop(token))
        return (step + 1, cache, token, done, out_tokens, out_logprobs, out_plain, out_mask)

    state = jax.lax.while_loop(keep_going, decode_step, state)
    _, _, _, _, out_tokens, out_logprobs, out_plain, out_mask = state
    return out_tokens, out_logprobs, out_plain, out_mask
