"""The Llama model configuration and the table of published and tiny variants."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of a Llama 2 model.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: width of the residual stream (D).
      intermediate_size: width of the SwiGLU MLP (F).
      num_layers: number of transformer blocks (L).
      num_heads: number of query heads (H).
      num_kv_heads: number of key/value heads (K); H must be a multiple of K. K == H is
        multi-head attention, K < H grouped-query attention.
      head_dim: width of one head; None means hidden_size // num_heads.
      max_seq_len: the longest sequence the model was trained for.
      rms_norm_eps: epsilon added to the mean square in RMSNorm.
      rope_theta: base of the rotary frequencies.
      rope_scaling_factor: linear position interpolation: positions are divided by this.
      tie_word_embeddings: whether the output projection reuses the token embedding.
      param_dtype: dtype in which parameters are stored.
      dtype: dtype of activations and matrix multiplications (normalization and softmax
        always run in float32).
      remat_policy: what each block saves for the backward pass: "none" saves everything,
        "full" recomputes the whole block, "dots" saves matrix-multiplication outputs,
        "dots_no_batch" saves those without batch dimensions.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim explicitly."
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"Rotary embeddings need an even head_dim, got {self.resolved_head_dim}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"LlamaConfig.remat_policy must be one of {REMAT_POLICIES}, "
                f"got {self.remat_policy!r}."
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"LlamaConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}."
                )
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ValueError(
                f"LlamaConfig.rope_scaling_factor must be positive, got {self.rope_scaling_factor}."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Counts the parameters of the language model."""
        d, f, h = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        block = attention + 3 * d * f + 2 * d
        total = self.num_layers * block + d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Estimates the FLOPs of one token, counting a multiply-add as two FLOPs.

        The count is 2 per weight for the matrix multiplications (the embedding lookup is
        free, the output projection is not) plus 2 * 2 * seq_len * H * head_dim per layer for
        the attention scores and the weighted sum over a causal window of mean length
        seq_len / 2 on each side, and it is tripled for a training step (forward and backward).
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        d, h = self.hidden_size, self.resolved_head_dim
        matmul_params = (
            self.num_layers
            * (
                d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
                + 3 * d * self.intermediate_size
            )
            + self.vocab_size * d
        )
        attention = self.num_layers * 2 * seq_len * self.num_heads * h
        forward = 2 * matmul_params + attention
        return float(3 * forward if training else forward)


# Published Llama 2 shapes (Touvron et al. 2023; the released config.json files) and tiny ones
# for tests and CPU runs.
VARIANTS: dict[str, LlamaConfig] = {
    "7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
    ),
    "13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
    ),
    "70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8
    ),
    # The shape of llama2.c's stories260K checkpoint.
    "stories260k": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_layers=5,
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=512,
        tie_word_embeddings=True,
    ),
    "tiny": LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=1024,
    ),
    "tiny_6l_512": LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        max_seq_len=1024,
    ),
}


def get_variant(name: str, **overrides: Any) -> LlamaConfig:
    """Returns the named variant of `VARIANTS`, with fields replaced by `overrides`."""
    if name not in VARIANTS:
        raise KeyError(f"Unknown Llama variant {name!r}; known variants: {sorted(VARIANTS)}.")
    return VARIANTS[name].replace(**overrides)
