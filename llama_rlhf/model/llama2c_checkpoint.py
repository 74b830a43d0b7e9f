"""Reading llama2.c checkpoints in its legacy `.bin` layout with numpy (nothing is unpickled).

The legacy layout (llama2.c's `export.py`, version 0) is a header of seven little-endian int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) followed by float32
tensors, each matrix stored as [out, in], layers stacked on the leading axis:

  token_embedding [V, D], rms_att [L, D], wq [L, H*E, D], wk [L, K*E, D], wv [L, K*E, D],
  wo [L, D, H*E], rms_ffn [L, D], w1 [L, F, D], w2 [L, D, F], w3 [L, F, D], rms_final [D],
  freq_cis_real [S, E/2], freq_cis_imag [S, E/2], and wcls [V, D] only when vocab_size < 0.

Here E = D / H, S is seq_len, w1 is the SwiGLU gate, w3 the up projection and w2 the down
projection. A negative vocab_size means the classifier is not shared with the embedding. The two
rotary tables are not read because the model computes its own. llama2.c, like Meta's reference
code, rotates adjacent pairs (x[2i], x[2i+1]) of each head, while this model rotates halves
(x[i], x[i + E/2]), so the rows of each head of wq and wk are reordered on import.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_rlhf.model.config import LlamaConfig

HEADER_INTS = 7
HEADER_BYTES = HEADER_INTS * 4
# Versioned exports (llama2.c `export.py --version 1` or 2) start with the uint32 "ak42".
VERSIONED_MAGIC = 0x616B3432
# llama2.c's run.c hard-codes these.
LLAMA2C_RMS_NORM_EPS = 1e-5
LLAMA2C_ROPE_THETA = 10000.0


def pairs_to_halves(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorders the output rows of a q or k projection from the adjacent-pairs to the halves layout.

    weight is [N*E, D] ([out, in]) for N heads. Within each head, row 2i (the first element of
    rotary pair i) moves to row i and row 2i+1 moves to row i + E/2, the permutation that Hugging
    Face's Llama conversion script applies to Meta's weights.
    """
    rows, columns = weight.shape
    head_dim = rows // num_heads
    # [N, E/2, 2, D] (pair index, member of the pair) -> [N, 2, E/2, D] -> [N*E, D].
    return (weight.reshape(num_heads, head_dim // 2, 2, columns)
            .transpose(0, 2, 1, 3)
            .reshape(rows, columns))


def _read_header(path: pathlib.Path) -> np.ndarray:
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file has {size} bytes, fewer than the {HEADER_BYTES}-byte "
                         "llama2.c header.")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.view("<u4")[0] == VERSIONED_MAGIC:
        version = int(np.fromfile(path, dtype="<i4", count=2)[1])
        raise ValueError(f"{path}: this is a versioned llama2.c export (version {version}); only "
                         "the legacy layout (export.py --version 0) is supported.")
    return header


def load_llama2c_checkpoint(path: str | os.PathLike, *, dtype=None
                            ) -> tuple[LlamaConfig, dict[str, jax.Array]]:
    """Loads a llama2.c legacy `.bin` checkpoint as (config, LM params).

    Args:
      path: the `.bin` file.
      dtype: dtype of the returned parameters; None keeps float32.

    Raises:
      ValueError: when the header is invalid or the file size differs from what the header
        implies (the message names the file and both byte counts).
    """
    path = pathlib.Path(path)
    dim, hidden_dim, num_layers, num_heads, num_kv_heads, vocab_size, seq_len = (
        int(value) for value in _read_header(path))
    shared_classifier = vocab_size > 0
    vocab_size = abs(vocab_size)
    fields = {"dim": dim, "hidden_dim": hidden_dim, "n_layers": num_layers, "n_heads": num_heads,
              "n_kv_heads": num_kv_heads, "vocab_size": vocab_size, "seq_len": seq_len}
    for name, value in fields.items():
        if value <= 0:
            raise ValueError(f"{path}: header field {name} is {value}, expected a positive "
                             "integer; is this a llama2.c legacy checkpoint?")
    if dim % num_heads or num_heads % num_kv_heads or (dim // num_heads) % 2:
        raise ValueError(f"{path}: header has dim {dim}, n_heads {num_heads} and n_kv_heads "
                         f"{num_kv_heads}; expected dim divisible by n_heads into an even head "
                         "size and n_heads divisible by n_kv_heads.")
    head_dim = dim // num_heads
    kv_dim = num_kv_heads * head_dim

    shapes = [
        ("token_embedding", (vocab_size, dim)),
        ("rms_att", (num_layers, dim)),
        ("wq", (num_layers, dim, dim)),
        ("wk", (num_layers, kv_dim, dim)),
        ("wv", (num_layers, kv_dim, dim)),
        ("wo", (num_layers, dim, dim)),
        ("rms_ffn", (num_layers, dim)),
        ("w1", (num_layers, hidden_dim, dim)),
        ("w2", (num_layers, dim, hidden_dim)),
        ("w3", (num_layers, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared_classifier:
        shapes.append(("wcls", (vocab_size, dim)))
    expected_bytes = HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in shapes)
    actual_bytes = path.stat().st_size
    if actual_bytes != expected_bytes:
        problem = "truncated" if actual_bytes < expected_bytes else "longer than expected"
        raise ValueError(
            f"{path}: file is {problem}: {actual_bytes} bytes, but its header ({fields}, "
            f"{'shared' if shared_classifier else 'separate'} classifier) implies "
            f"{expected_bytes} bytes."
        )

    memory = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    tensors, offset = {}, 0
    for name, shape in shapes:
        count = int(np.prod(shape))
        tensors[name] = memory[offset:offset + count].reshape(shape)
        offset += count

    def stacked(name, convert):
        return np.stack([convert(layer) for layer in tensors[name]])

    # Each per-layer conversion maps llama2.c's [out, in] to our [in, ...out] kernel.
    params = {
        "embed": np.array(tensors["token_embedding"]),
        "layers": {
            "attention": {
                "q_proj": stacked("wq", lambda w: pairs_to_halves(w, num_heads).T
                                  .reshape(dim, num_heads, head_dim)),
                "k_proj": stacked("wk", lambda w: pairs_to_halves(w, num_kv_heads).T
                                  .reshape(dim, num_kv_heads, head_dim)),
                "v_proj": stacked("wv", lambda w: w.T.reshape(dim, num_kv_heads, head_dim)),
                "o_proj": stacked("wo", lambda w: w.T.reshape(num_heads, head_dim, dim)),
            },
            "attention_norm": {"scale": np.array(tensors["rms_att"])},
            "mlp": {
                "gate_proj": stacked("w1", lambda w: w.T),
                "up_proj": stacked("w3", lambda w: w.T),
                "down_proj": stacked("w2", lambda w: w.T),
            },
            "mlp_norm": {"scale": np.array(tensors["rms_ffn"])},
        },
        "final_norm": {"scale": np.array(tensors["rms_final"])},
    }
    if not shared_classifier:
        params["lm_head"] = np.array(tensors["wcls"]).T

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_seq_len=seq_len,
        rms_norm_eps=LLAMA2C_RMS_NORM_EPS,
        rope_theta=LLAMA2C_ROPE_THETA,
        tie_word_embeddings=shared_classifier,
    )
    if dtype is not None:
        config = config.replace(param_dtype=jnp.dtype(dtype).name)
    param_dtype = config.jnp_param_dtype
    return config, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
