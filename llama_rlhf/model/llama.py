"""Llama 2 in Flax Linen: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

Einsum letters used in this file:
  B batch, T query length, S key length (the whole cache when decoding), D hidden size,
  H query heads, K key/value heads, G query heads per key/value head (H = K * G),
  E head dimension, F MLP width, V vocabulary, L layers.

Conventions:
  - Positions count real tokens only: a left-padded prompt's first real token has position 0.
    Callers pass `positions`; `positions_from_mask` computes them from a padding mask.
  - `mask` marks real tokens; a padded key is never attended to. Padded queries produce finite
    values that callers must ignore.
  - Rotary embeddings rotate the two halves of each head (the Hugging Face layout). Checkpoints
    that rotate adjacent pairs (Meta's and llama2.c's) are converted on import.
  - Layers are stacked with `nn.scan`, so every block parameter has a leading `layers` axis and
    compile time does not grow with depth.
  - When decoding, the whole KV cache is part of the scan carry and each layer writes its new
    keys and values into it in place, at (layer, :, :, index). Scanning over per-layer slices
    instead makes XLA copy every layer's cache at every step. The cache keeps the slot axis
    next to the head dimension, [L, B, K, S, E], so attention reads it without a transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from llama_rlhf import sharding as shd
from llama_rlhf.model.config import LlamaConfig

HEADS = ("lm", "scalar", "none")


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Returns the position of each token counting real tokens only ([B, T] -> [B, T])."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    Attributes:
      keys: [L, B, K, S, E] keys of every cache slot (rotary already applied).
      values: [L, B, K, S, E].
      mask: [B, S] whether a slot holds a real token.
      index: scalar int32, the next slot to write. All rows of a batch write the same slots,
        so prompts of different lengths are left-padded to a common length.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """Returns an empty cache with `max_length` slots per sequence."""
        dtype = config.jnp_dtype if dtype is None else dtype
        shape = (
            config.num_layers,
            batch_size,
            config.num_kv_heads,
            max_length,
            config.resolved_head_dim,
        )
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    @staticmethod
    def logical_axes() -> KVCache:
        """Returns the logical axis names of each field, for sharding the cache."""
        kv = (shd.LAYERS, shd.BATCH, shd.ACT_KV_HEADS, shd.CACHE_LENGTH, None)
        return KVCache(keys=kv, values=kv, mask=(shd.BATCH, shd.CACHE_LENGTH), index=())


class RMSNorm(nn.Module):
    """Root-mean-square normalization, y = x / sqrt(mean(x²) + eps) * scale, in float32."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(
            self, "scale", nn.initializers.ones, (x.shape[-1],), (shd.EMBED,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Like the reference implementations, cast back before applying the scale.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(
    x: jax.Array, positions: jax.Array, theta: float, scaling_factor: float | None
) -> jax.Array:
    """Rotates each head of x ([B, T, N, E]) by its position ([B, T]), halves layout.

    For frequency i < E/2, the pair (x[i], x[i + E/2]) is rotated by the angle
    position * theta^(-2i/E); linear scaling divides the position by `scaling_factor`.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    pos = positions.astype(jnp.float32)
    if scaling_factor is not None:
        pos = pos / scaling_factor
    # [B, T, E/2] angles, broadcast over heads.
    angles = pos[..., None] * inv_freq
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head or grouped-query self-attention with rotary embeddings."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x, positions, mask, cache=None, cache_mask=None, cache_index=None, layer=None
    ):
        """Attends from x [B, T, D]; with `cache` (keys, values [L, B, K, S, E]), over the cache.

        Returns (output [B, T, D], the cache with this layer's new keys and values or None).
        """
        cfg = self.config
        dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
        d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init = nn.initializers.normal(stddev=0.02)
        wq = _param(self, "q_proj", init, (d, h, e), (shd.EMBED, shd.HEADS, shd.HEAD_DIM), pdtype)
        wk = _param(
            self, "k_proj", init, (d, k, e), (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM), pdtype
        )
        wv = _param(
            self, "v_proj", init, (d, k, e), (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM), pdtype
        )
        wo = _param(self, "o_proj", init, (h, e, d), (shd.HEADS, shd.HEAD_DIM, shd.EMBED), pdtype)

        query = jnp.einsum("btd,dhe->bthe", x, wq.astype(dtype))
        key = jnp.einsum("btd,dke->btke", x, wk.astype(dtype))
        value = jnp.einsum("btd,dke->btke", x, wv.astype(dtype))
        query = rotary_embedding(query, positions, cfg.rope_theta, cfg.rope_scaling_factor)
        key = rotary_embedding(key, positions, cfg.rope_theta, cfg.rope_scaling_factor)

        t = x.shape[1]
        # [B, T, K, E] -> [B, K, T, E], the cache layout.
        key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
        if cache is None:
            # Causal attention within the given tokens, never to padded keys.
            causal = jnp.tril(jnp.ones((t, t), bool))
            allowed = causal[None] & mask[:, None, :]
            new_cache = None
        else:
            # Write the new keys and values of this layer at slots [index, index + T) and
            # attend over all of its slots.
            all_keys, all_values = cache
            start = (layer, 0, 0, cache_index, 0)
            all_keys = jax.lax.dynamic_update_slice(
                all_keys, key[None].astype(all_keys.dtype), start
            )
            all_values = jax.lax.dynamic_update_slice(
                all_values, value[None].astype(all_values.dtype), start
            )
            key = jax.lax.dynamic_index_in_dim(all_keys, layer, keepdims=False).astype(dtype)
            value = jax.lax.dynamic_index_in_dim(all_values, layer, keepdims=False).astype(dtype)
            slots = jnp.arange(all_keys.shape[3])
            query_slots = cache_index + jnp.arange(t)
            # [B, T, S]: a query sees real slots at or before its own slot.
            allowed = (slots[None, :] <= query_slots[:, None])[None] & cache_mask[:, None, :]
            new_cache = (all_keys, all_values)

        # Group the H query heads as K groups of G heads that share one key/value head.
        b = x.shape[0]
        query = query.reshape(b, t, k, h // k, e)
        logits = jnp.einsum("btkge,bkse->bkgts", query, key).astype(jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(e))
        # A finite fill keeps rows without any visible key (left padding) free of NaNs.
        logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bkse->btkge", probs, value).reshape(b, t, h, e)
        out = jnp.einsum("bthe,hed->btd", out, wo.astype(dtype))
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
        d, f = cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(stddev=0.02)
        gate = _param(self, "gate_proj", init, (d, f), (shd.EMBED, shd.MLP), pdtype)
        up = _param(self, "up_proj", init, (d, f), (shd.EMBED, shd.MLP), pdtype)
        down = _param(self, "down_proj", init, (f, d), (shd.MLP, shd.EMBED), pdtype)
        hidden = nn.silu(x @ gate.astype(dtype)) * (x @ up.astype(dtype))
        hidden = shd.constrain(hidden, (shd.BATCH, shd.LENGTH, shd.ACT_MLP))
        return hidden @ down.astype(dtype)


class Block(nn.Module):
    """One pre-norm transformer block; the scan body over layers.

    The scan carry is (x [B, T, D], cache). The cache is None or the (keys, values) of all
    layers, and the scanned input is the layer's index into it.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, layer, positions, mask, cache_mask, cache_index):
        x, cache = carry
        cfg = self.config
        pdtype = cfg.jnp_param_dtype
        x = shd.constrain(x, (shd.BATCH, shd.LENGTH, shd.ACT_EMBED))
        attn_out, new_cache = Attention(cfg, name="attention")(
            RMSNorm(cfg.rms_norm_eps, pdtype, name="attention_norm")(x),
            positions,
            mask,
            cache,
            cache_mask,
            cache_index,
            layer,
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, pdtype, name="mlp_norm")(x))
        return (x, new_cache), None


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class Llama(nn.Module):
    """The Llama 2 decoder with a language-model, scalar or no head.

    Attributes:
      config: the model shape and numerics.
      head: "lm" returns next-token logits [B, T, V]; "scalar" returns one value per position
        [B, T] (reward and value models); "none" returns the final normalized hidden states
        [B, T, D].
    """

    config: LlamaConfig
    head: str = "lm"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ):
        """Runs the model on tokens [B, T].

        Args:
          tokens: int token ids [B, T].
          positions: position of each token counting real tokens only; by default computed
            from `mask` (and, when decoding, from the tokens already in the cache).
          mask: bool [B, T], True for real tokens; all True by default.
          cache: a `KVCache` to decode with; the tokens are written at `cache.index`.

        Returns:
          (outputs, new_cache): outputs as described for `head`; new_cache is None without a
          cache.
        """
        cfg = self.config
        if self.head not in HEADS:
            raise ValueError(f"Llama.head must be one of {HEADS}, got {self.head!r}.")
        dtype, pdtype = cfg.jnp_dtype, cfg.jnp_param_dtype
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        mask = mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = positions + jnp.sum(cache.mask, axis=-1, keepdims=True)

        embedding = _param(
            self,
            "embed",
            nn.initializers.normal(stddev=0.02),
            (cfg.vocab_size, cfg.hidden_size),
            (shd.VOCAB, shd.EMBED),
            pdtype,
        )
        # Gather from a table whose embedding axis is whole: a lookup into a table that is
        # split over `fsdp` along D, with tokens split over `fsdp` along B, would make XLA
        # replicate the result ("involuntary full rematerialization").
        table = shd.constrain(embedding, (shd.VOCAB, None))
        x = jnp.take(table, tokens, axis=0).astype(dtype)
        x = shd.constrain(x, (shd.BATCH, shd.LENGTH, shd.ACT_EMBED))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_remat_policy(cfg.remat_policy))
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: shd.LAYERS},
        )
        if cache is None:
            kv_cache, cache_mask, cache_index = None, None, None
        else:
            kv_cache = (cache.keys, cache.values)
            cache_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            cache_index = cache.index
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, new_kv_cache), _ = stack(cfg, name="layers")(
            (x, kv_cache), layers, positions, mask, cache_mask, cache_index
        )
        x = RMSNorm(cfg.rms_norm_eps, pdtype, name="final_norm")(x)
        x = shd.constrain(x, (shd.BATCH, shd.LENGTH, shd.ACT_EMBED))

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=new_kv_cache[0],
                values=new_kv_cache[1],
                mask=cache_mask,
                index=cache.index + tokens.shape[1],
            )

        if self.head == "none":
            return x, new_cache
        if self.head == "scalar":
            kernel = _param(
                self,
                "score_head",
                nn.initializers.normal(stddev=0.02),
                (cfg.hidden_size, 1),
                (shd.EMBED, shd.SCALAR),
                pdtype,
            )
            bias = _param(self, "score_bias", nn.initializers.zeros, (1,), (shd.SCALAR,), pdtype)
            scores = (x @ kernel.astype(dtype) + bias.astype(dtype))[..., 0]
            return scores.astype(jnp.float32), new_cache
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dtype))
        else:
            lm_head = _param(
                self,
                "lm_head",
                nn.initializers.normal(stddev=0.02),
                (cfg.hidden_size, cfg.vocab_size),
                (shd.EMBED, shd.VOCAB),
                pdtype,
            )
            logits = x @ lm_head.astype(dtype)
        logits = shd.constrain(logits, (shd.BATCH, shd.LENGTH, shd.ACT_VOCAB))
        return logits.astype(jnp.float32), new_cache
