"""Reading and writing Hugging Face Llama checkpoints (config.json + safetensors) without torch.

A Hugging Face `LlamaForCausalLM` checkpoint is a folder with `config.json` and either one
`model.safetensors` file or several shards listed by `model.safetensors.index.json`. Tensors are
read with safetensors' numpy backend, so nothing is unpickled and torch is not needed at run time.
PyTorch pickle checkpoints (`pytorch_model.bin`) are rejected.

Tensor layout (D hidden size, H query heads, K key/value heads, E head dimension, F MLP width,
V vocabulary, L layers). A `torch.nn.Linear` weight is stored as [out, in]; our kernels are
[in, ...out] with the layers stacked on a leading axis:

  model.embed_tokens.weight                  [V, D]    -> embed [V, D]
  model.layers.{i}.self_attn.q_proj.weight   [H*E, D]  -> layers/attention/q_proj [L, D, H, E]
  model.layers.{i}.self_attn.k_proj.weight   [K*E, D]  -> layers/attention/k_proj [L, D, K, E]
  model.layers.{i}.self_attn.v_proj.weight   [K*E, D]  -> layers/attention/v_proj [L, D, K, E]
  model.layers.{i}.self_attn.o_proj.weight   [D, H*E]  -> layers/attention/o_proj [L, H, E, D]
  model.layers.{i}.mlp.gate_proj.weight      [F, D]    -> layers/mlp/gate_proj [L, D, F]
  model.layers.{i}.mlp.up_proj.weight        [F, D]    -> layers/mlp/up_proj [L, D, F]
  model.layers.{i}.mlp.down_proj.weight      [D, F]    -> layers/mlp/down_proj [L, F, D]
  model.layers.{i}.input_layernorm.weight    [D]       -> layers/attention_norm/scale [L, D]
  model.layers.{i}.post_attention_layernorm.weight [D] -> layers/mlp_norm/scale [L, D]
  model.norm.weight                          [D]       -> final_norm/scale [D]
  lm_head.weight (absent when tied)          [V, D]    -> lm_head [D, V]

Both layouts rotate the two halves of each head, so q_proj and k_proj need no row permutation.
The conversion only transposes, reshapes and stacks, so HF -> Flax -> HF is exact bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

# safetensors' numpy backend looks up the "bfloat16" dtype by name, and numpy only has that name
# once ml_dtypes registers it. Without this import, BF16 tensors fail with "data type not
# understood".
import ml_dtypes  # noqa: F401
import numpy as np
import safetensors
import safetensors.numpy
from jax.sharding import Mesh
from safetensors import safe_open

from llama_rlhf.model.config import DTYPES, LlamaConfig
from llama_rlhf.model.llama import HEADS
from llama_rlhf.model.params import param_shardings

logger = logging.getLogger(__name__)

HF_ARCHITECTURE = "LlamaForCausalLM"
HF_MODEL_TYPE = "llama"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

# config.json fields read into LlamaConfig, and those with no effect on the forward pass.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
_MAPPED_FIELDS = _REQUIRED_FIELDS + (
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "architectures", "model_type",
    "hidden_act", "attention_bias", "mlp_bias", "attention_dropout", "quantization_config",
)
_HARMLESS_FIELDS = frozenset({
    "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "use_cache", "transformers_version", "torch_dtype", "dtype", "output_attentions",
    "output_hidden_states", "return_dict", "tokenizer_class", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type",
    # When > 1, transformers 4.x splits each projection into this many slices and adds the
    # partial products (the same math in another order). transformers 5.25 does not read it.
    "pretraining_tp",
})
# Checkpoints from older transformers releases may contain the rotary inverse frequencies as
# buffers. They follow from the config, so loading skips them.
_ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Defaults of transformers' LlamaConfig (5.x) for optional fields.
_HF_DEFAULTS = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def _get_int(config_dict: Mapping[str, Any], field: str, source: str,
             default: int | None = None) -> int:
    value = config_dict.get(field)
    if value is None:
        if default is None:
            raise ValueError(f"{source}: missing required field {field!r} (a positive integer).")
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: field {field!r} must be an integer, got {value!r}.")
    return value


def _get_float(config_dict: Mapping[str, Any], field: str, source: str, default: float) -> float:
    value = config_dict.get(field, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: field {field!r} must be a number, got {value!r}.")
    return float(value)


def _rope_from_hf(config_dict: Mapping[str, Any], source: str) -> tuple[float, float | None]:
    """Reads (rope_theta, linear scaling factor or None) from either config.json layout.

    transformers 5.x writes `rope_parameters: {rope_type, rope_theta, factor}`; 4.x writes a
    top-level `rope_theta` and `rope_scaling: null | {type or rope_type, factor}`.
    """
    parameters = config_dict.get("rope_parameters")
    if parameters is not None:
        field = "rope_parameters"
        if not isinstance(parameters, Mapping):
            raise ValueError(f"{source}: field 'rope_parameters' must be an object, got "
                             f"{parameters!r}.")
        theta = _get_float(parameters, "rope_theta",
                           f"{source} (rope_parameters)",
                           _get_float(config_dict, "rope_theta", source, 10000.0))
        scaling = parameters
    else:
        field = "rope_scaling"
        theta = _get_float(config_dict, "rope_theta", source, _HF_DEFAULTS["rope_theta"])
        scaling = config_dict.get("rope_scaling")
        if scaling is None:
            return theta, None
        if not isinstance(scaling, Mapping):
            raise ValueError(f"{source}: field 'rope_scaling' must be null or an object, got "
                             f"{scaling!r}.")

    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "linear":
        raise ValueError(
            f"{source}: unsupported {field}.rope_type {rope_type!r}; expected 'default' or "
            "'linear' (position interpolation by a constant factor)."
        )
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"{source}: {field}.factor must be a positive number for linear rope "
                         f"scaling, got {factor!r}.")
    return theta, float(factor)


def _check_unsupported(config_dict: Mapping[str, Any], source: str) -> None:
    architectures = config_dict.get("architectures")
    if architectures is not None and list(architectures) != [HF_ARCHITECTURE]:
        raise ValueError(f"{source}: unsupported architectures {architectures!r}; expected "
                         f"[{HF_ARCHITECTURE!r}].")
    model_type = config_dict.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; expected "
                         f"{HF_MODEL_TYPE!r}.")
    expected = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for field, value in expected.items():
        if field in config_dict and config_dict[field] != value:
            raise ValueError(f"{source}: unsupported {field} {config_dict[field]!r}; this model "
                             f"supports only {value!r}.")
    dropout = config_dict.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise ValueError(f"{source}: unsupported attention_dropout {dropout!r}; this model has "
                         "no dropout, expected 0.0.")
    if config_dict.get("quantization_config") is not None:
        raise ValueError(f"{source}: quantized checkpoints (field 'quantization_config') are not "
                         "supported; expected plain floating-point weights.")


def config_from_hf(config_dict: Mapping[str, Any], *, source: str = CONFIG_FILE) -> LlamaConfig:
    """Converts a Hugging Face Llama `config.json` dictionary to a `LlamaConfig`.

    Fields that change the forward pass and are not supported (other architectures, biases,
    activations other than SiLU, rope types other than default and linear, dropout,
    quantization) raise a `ValueError` naming the field and the expected value. Fields without
    effect on the forward pass are ignored; unknown fields are logged and ignored. Missing
    optional fields take transformers' defaults. `param_dtype` and `dtype` keep LlamaConfig's
    defaults: the stored dtype is a property of the tensors, not of the model.

    Args:
      config_dict: the parsed config.json.
      source: the name used in error messages.
    """
    if not isinstance(config_dict, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config_dict).__name__}.")
    _check_unsupported(config_dict, source)

    num_heads = _get_int(config_dict, "num_attention_heads", source)
    num_kv_heads = config_dict.get("num_key_value_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _get_int(
        config_dict, "num_key_value_heads", source)
    if num_heads > 0 and num_kv_heads > 0 and num_heads % num_kv_heads:
        raise ValueError(f"{source}: num_attention_heads ({num_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads}).")
    hidden_size = _get_int(config_dict, "hidden_size", source)
    head_dim = config_dict.get("head_dim")
    if head_dim is not None:
        head_dim = _get_int(config_dict, "head_dim", source)
        # Keep the implicit form when it matches, so configs compare equal to the variant table.
        if num_heads > 0 and head_dim * num_heads == hidden_size:
            head_dim = None
    rope_theta, rope_scaling_factor = _rope_from_hf(config_dict, source)
    tie = config_dict.get("tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise ValueError(f"{source}: field 'tie_word_embeddings' must be true or false, got "
                         f"{tie!r}.")

    unknown = sorted(set(config_dict) - set(_MAPPED_FIELDS) - _HARMLESS_FIELDS)
    if unknown:
        logger.warning("%s: ignoring fields this converter does not know: %s", source, unknown)

    try:
        return LlamaConfig(
            vocab_size=_get_int(config_dict, "vocab_size", source),
            hidden_size=hidden_size,
            intermediate_size=_get_int(config_dict, "intermediate_size", source),
            num_layers=_get_int(config_dict, "num_hidden_layers", source),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_seq_len=_get_int(config_dict, "max_position_embeddings", source,
                                 _HF_DEFAULTS["max_position_embeddings"]),
            rms_norm_eps=_get_float(config_dict, "rms_norm_eps", source,
                                    _HF_DEFAULTS["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling_factor=rope_scaling_factor,
            tie_word_embeddings=tie,
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """Converts a `LlamaConfig` to a Hugging Face `config.json` dictionary.

    Rotary settings are written both as transformers 4.x fields (`rope_theta`, `rope_scaling`)
    and as the 5.x `rope_parameters`, so both major versions read the file.
    """
    if config.rope_scaling_factor is None:
        rope_scaling = None
        rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    else:
        rope_scaling = {"rope_type": "linear", "factor": config.rope_scaling_factor}
        rope_parameters = {"rope_type": "linear", "factor": config.rope_scaling_factor,
                           "rope_theta": config.rope_theta}
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": config.param_dtype,
    }


# ------------------------------------------------------------------------------------------------
# Tensor name and layout mapping
# ------------------------------------------------------------------------------------------------

# (HF name inside model.layers.{i}, our path under "layers", HF shape, our per-layer shape),
# with shapes as functions of (D, F, H, K, E).
_LAYER_TENSORS = (
    ("self_attn.q_proj.weight", ("attention", "q_proj"),
     lambda d, f, h, k, e: (h * e, d), lambda d, f, h, k, e: (d, h, e)),
    ("self_attn.k_proj.weight", ("attention", "k_proj"),
     lambda d, f, h, k, e: (k * e, d), lambda d, f, h, k, e: (d, k, e)),
    ("self_attn.v_proj.weight", ("attention", "v_proj"),
     lambda d, f, h, k, e: (k * e, d), lambda d, f, h, k, e: (d, k, e)),
    ("self_attn.o_proj.weight", ("attention", "o_proj"),
     lambda d, f, h, k, e: (d, h * e), lambda d, f, h, k, e: (h, e, d)),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj"),
     lambda d, f, h, k, e: (f, d), lambda d, f, h, k, e: (d, f)),
    ("mlp.up_proj.weight", ("mlp", "up_proj"),
     lambda d, f, h, k, e: (f, d), lambda d, f, h, k, e: (d, f)),
    ("mlp.down_proj.weight", ("mlp", "down_proj"),
     lambda d, f, h, k, e: (d, f), lambda d, f, h, k, e: (f, d)),
    ("input_layernorm.weight", ("attention_norm", "scale"),
     lambda d, f, h, k, e: (d,), lambda d, f, h, k, e: (d,)),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"),
     lambda d, f, h, k, e: (d,), lambda d, f, h, k, e: (d,)),
)


def _dims(config: LlamaConfig) -> tuple[int, int, int, int, int]:
    return (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
            config.resolved_head_dim)


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Returns the name and shape of every tensor of a `LlamaForCausalLM` checkpoint."""
    dims = _dims(config)
    d, v = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d)}
    for layer in range(config.num_layers):
        for name, _, hf_shape, _ in _LAYER_TENSORS:
            shapes[f"model.layers.{layer}.{name}"] = hf_shape(*dims)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _layer_sort_key(name: str):
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def check_hf_tensors(shapes: Mapping[str, tuple[int, ...]], config: LlamaConfig,
                     source: str) -> None:
    """Checks that a checkpoint has exactly the tensors and shapes `config` needs.

    Raises:
      ValueError: naming the missing, unexpected or misshapen tensor and what was expected.
    """
    expected = expected_hf_shapes(config)
    present = {name for name in shapes if not _ROTARY_BUFFER.fullmatch(name)}
    missing = sorted(set(expected) - present, key=_layer_sort_key)
    if missing:
        listed = ", ".join(f"{name} {list(expected[name])}" for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{source}: missing tensor(s) {listed}{more}; a LlamaForCausalLM with "
            f"{config.num_layers} layers and tie_word_embeddings={config.tie_word_embeddings} "
            "needs them."
        )
    extra = sorted(present - set(expected), key=_layer_sort_key)
    if extra:
        hint = ""
        if "lm_head.weight" in extra and config.tie_word_embeddings:
            hint = " (lm_head.weight is not expected because tie_word_embeddings is true)"
        raise ValueError(
            f"{source}: unexpected tensor(s) {extra[:5]}{hint}; expected only the "
            f"{len(expected)} tensors of a LlamaForCausalLM with {config.num_layers} layers."
        )
    for name, shape in expected.items():
        actual = tuple(shapes[name])
        if actual != shape:
            raise ValueError(f"{source}: tensor {name} has shape {list(actual)}, expected "
                             f"{list(shape)} from the config.")


def hf_state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: LlamaConfig, *,
                            head: str = "lm", source: str = "state dict") -> dict[str, Any]:
    """Converts HF tensors (name -> [out, in] array) to our parameter tree of numpy arrays.

    With `head` "scalar" or "none" the LM head is dropped; "scalar" does not add the score head
    (see `init_score_head`). Arrays keep their dtype.

    Raises:
      ValueError: when a tensor is missing, unexpected or has the wrong shape.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
    check_hf_tensors({name: np.shape(value) for name, value in state_dict.items()}, config,
                     source)
    return _convert_hf_tensors(lambda name: np.asarray(state_dict[name]), config, head)


def _convert_hf_tensors(read: Callable[[str], np.ndarray], config: LlamaConfig,
                        head: str) -> dict[str, Any]:
    """Builds the parameter tree, calling `read` once per HF tensor name (shapes already checked).

    Reading one stacked parameter at a time keeps the peak host memory near the size of the
    result when `read` loads from disk.
    """
    dims = _dims(config)
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, (group, leaf), _, our_shape in _LAYER_TENSORS:
        per_layer = []
        for layer in range(config.num_layers):
            weight = read(f"model.layers.{layer}.{name}")
            # [out, in] -> [in, out] for matrices, then split the head axes.
            per_layer.append(weight.T.reshape(our_shape(*dims)) if weight.ndim == 2 else weight)
        layers.setdefault(group, {})[leaf] = np.stack(per_layer)

    params: dict[str, Any] = {
        "embed": read("model.embed_tokens.weight"),
        "layers": layers,
        "final_norm": {"scale": read("model.norm.weight")},
    }
    if head == "lm" and not config.tie_word_embeddings:
        params["lm_head"] = read("lm_head.weight").T
    return params


def _param_path_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    dims = _dims(config)
    shapes = {("embed",): (config.vocab_size, config.hidden_size)}
    for _, path, _, our_shape in _LAYER_TENSORS:
        shapes[("layers",) + path] = (config.num_layers,) + our_shape(*dims)
    shapes[("final_norm", "scale")] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes[("lm_head",)] = (config.hidden_size, config.vocab_size)
    return shapes


def params_to_hf_state_dict(params: Mapping[str, Any], config: LlamaConfig
                            ) -> dict[str, np.ndarray]:
    """Converts our LM parameter tree to HF tensors (name -> contiguous [out, in] numpy array).

    Raises:
      ValueError: when a parameter is missing, unexpected (such as a score head, which
        `LlamaForCausalLM` has no place for) or has the wrong shape.
    """
    expected = _param_path_shapes(config)
    flat = {
        tuple(getattr(key, "key", key) for key in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    for path in expected:
        if path not in flat:
            raise ValueError(f"params: missing parameter {'/'.join(path)} "
                             f"{list(expected[path])}, needed for a LlamaForCausalLM checkpoint.")
    for path in flat:
        if path not in expected:
            raise ValueError(f"params: unexpected parameter {'/'.join(path)}; a "
                             "LlamaForCausalLM checkpoint holds only the language model "
                             f"(expected {sorted('/'.join(p) for p in expected)}).")
    for path, shape in expected.items():
        if tuple(flat[path].shape) != shape:
            raise ValueError(f"params: parameter {'/'.join(path)} has shape "
                             f"{list(flat[path].shape)}, expected {list(shape)} from the config.")

    def host(path):
        return np.asarray(flat[path])

    hf_dims = _dims(config)
    state = {"model.embed_tokens.weight": np.ascontiguousarray(host(("embed",)))}
    stacked = {name: host(("layers",) + path) for name, path, _, _ in _LAYER_TENSORS}
    for layer in range(config.num_layers):
        for name, _, hf_shape, _ in _LAYER_TENSORS:
            weight = stacked[name][layer]
            if weight.ndim > 1:
                # [in, ...out] -> [in, out] -> [out, in].
                weight = weight.reshape(hf_shape(*hf_dims)[::-1]).T
            state[f"model.layers.{layer}.{name}"] = np.ascontiguousarray(weight)
    state["model.norm.weight"] = np.ascontiguousarray(host(("final_norm", "scale")))
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = np.ascontiguousarray(host(("lm_head",)).T)
    return state


def init_score_head(params: Mapping[str, Any], config: LlamaConfig, *,
                    rng: jax.Array | None = None) -> dict[str, Any]:
    """Replaces the LM head of `params` with a scalar head for reward and value models.

    The score kernel [D, 1] is zeros when `rng` is None, so every initial score is the bias (0)
    and the ranking loss starts at log 2; with an `rng` it is drawn from N(0, 0.02²), the
    initializer `init_params` uses. The score bias [1] starts at zero.
    """
    params = {name: value for name, value in params.items() if name != "lm_head"}
    dtype = params["embed"].dtype
    shape = (config.hidden_size, 1)
    if rng is None:
        params["score_head"] = np.zeros(shape, dtype)
    else:
        params["score_head"] = np.asarray(0.02 * jax.random.normal(rng, shape, jnp.float32)
                                          ).astype(dtype)
    params["score_bias"] = np.zeros((1,), dtype)
    return params


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error}).") from error


@contextlib.contextmanager
def _open_safetensors(path: pathlib.Path):
    """Opens a safetensors file for numpy reads, naming the file when it is not valid."""
    try:
        handle = safe_open(path, framework="numpy")
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error}).") from error
    with handle:
        yield handle


def _tensor_files(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Maps each tensor name to the safetensors file that contains it."""
    index_path = model_dir / SAFETENSORS_INDEX_FILE
    single_path = model_dir / SAFETENSORS_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
        if not isinstance(weight_map, Mapping):
            raise ValueError(f"{index_path}: missing object 'weight_map' (tensor name -> shard "
                             "file).")
        files = {}
        for name, file_name in weight_map.items():
            path = model_dir / file_name
            if pathlib.Path(file_name).name != file_name or not path.is_file():
                raise FileNotFoundError(f"{index_path}: shard {file_name!r} of tensor {name} not "
                                        f"found in {model_dir}.")
            files[name] = path
        return files
    if single_path.is_file():
        with _open_safetensors(single_path) as file:
            return dict.fromkeys(file.keys(), single_path)
    pickled = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if (model_dir / name).exists()]
    hint = (f" Found {pickled[0]}, a PyTorch pickle, which is not read because unpickling can run "
            "code; convert it to safetensors first.") if pickled else ""
    raise FileNotFoundError(f"{model_dir}: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}"
                            f" found.{hint}")


def _normalize_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    resolved = jnp.dtype(dtype)
    if resolved.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    return resolved


def load_hf_checkpoint(model_dir: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None,
                       head: str = "lm", score_rng: jax.Array | None = None
                       ) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Hugging Face `LlamaForCausalLM` safetensors checkpoint as (config, params).

    Args:
      model_dir: folder with config.json and model.safetensors or
        model.safetensors.index.json and its shards.
      dtype: dtype of the returned parameters ("float32", "bfloat16" or "float16"); None keeps
        the stored dtype, which must then be the same for every tensor. The returned config's
        `param_dtype` is this dtype; its activation `dtype` stays float32.
      mesh: when given, each parameter is placed with `param_shardings(config, mesh, head)`.
      head: "lm" keeps the LM head; "scalar" replaces it with a score head (see
        `init_score_head`, which gets `score_rng`); "none" drops it.
      score_rng: key for the score kernel with head "scalar"; None initializes it to zeros.

    Raises:
      FileNotFoundError: when config.json, the weights or a shard are missing.
      ValueError: for an unsupported config field, a missing, unexpected or misshapen tensor, or
        mixed stored dtypes with `dtype=None`.
    """
    model_dir = pathlib.Path(model_dir)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; a Hugging Face checkpoint folder "
                                "needs config.json.")
    config = config_from_hf(_read_json(config_path), source=str(config_path))
    target_dtype = _normalize_dtype(dtype)

    files = _tensor_files(model_dir)
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open_safetensors(path))
                   for path in sorted(set(files.values()))}
        names_in_file = {path: set(handle.keys()) for path, handle in handles.items()}
        shapes, stored_dtypes = {}, set()
        for name, path in files.items():
            if name not in names_in_file[path]:
                raise ValueError(f"{path}: tensor {name} listed in {SAFETENSORS_INDEX_FILE} is "
                                 "not in this shard.")
            tensor_slice = handles[path].get_slice(name)
            shapes[name] = tuple(tensor_slice.get_shape())
            if not _ROTARY_BUFFER.fullmatch(name):
                stored_dtypes.add(tensor_slice.get_dtype())
        check_hf_tensors(shapes, config, str(model_dir))
        if target_dtype is None and len(stored_dtypes) > 1:
            raise ValueError(f"{model_dir}: tensors are stored in several dtypes "
                             f"{sorted(stored_dtypes)}; pass dtype= to load them as one.")

        def read(name: str) -> np.ndarray:
            tensor = handles[files[name]].get_tensor(name)
            if target_dtype is not None and tensor.dtype != target_dtype:
                tensor = tensor.astype(target_dtype)
            return tensor

        params = _convert_hf_tensors(read, config, head)

    param_dtype = jnp.dtype(params["embed"].dtype)
    if param_dtype.name not in DTYPES:
        raise ValueError(f"{model_dir}: tensors are stored as {param_dtype.name}; pass dtype= one "
                         f"of {DTYPES} to convert them.")
    config = config.replace(param_dtype=param_dtype.name)
    if head == "scalar":
        params = init_score_head(params, config, rng=score_rng)

    if mesh is None:
        params = jax.tree.map(jnp.asarray, params)
    else:
        params = jax.device_put(params, param_shardings(config, mesh, head))
    return config, params


def _plan_shards(state: Mapping[str, np.ndarray], max_shard_bytes: int | None) -> list[list[str]]:
    """Groups tensor names into shards of at most `max_shard_bytes` (a bigger tensor is alone)."""
    if max_shard_bytes is None:
        return [list(state)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def save_hf_checkpoint(model_dir: str | os.PathLike, config: LlamaConfig,
                       params: Mapping[str, Any], *, max_shard_bytes: int | None = None,
                       overwrite: bool = False) -> pathlib.Path:
    """Saves LM parameters as a Hugging Face `LlamaForCausalLM` checkpoint.

    Writes config.json and either model.safetensors or, when `max_shard_bytes` is given and the
    tensors need more than one shard, model-0000i-of-0000n.safetensors files plus
    model.safetensors.index.json. Tensors keep the dtype of `params`. Everything is written to a
    temporary folder next to `model_dir` and renamed into place, so readers never see a partial
    checkpoint.

    Args:
      model_dir: the folder to create.
      config: the model configuration.
      params: an LM parameter tree (a scalar-head tree raises, since LlamaForCausalLM has no
        score head).
      max_shard_bytes: the maximum size of one shard file's tensors; None writes one file.
      overwrite: replace an existing `model_dir`; without it an existing folder raises.

    Returns:
      The path of the checkpoint folder.
    """
    model_dir = pathlib.Path(model_dir)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    if model_dir.exists() and not overwrite:
        raise FileExistsError(f"{model_dir} already exists; pass overwrite=True to replace it.")
    state = params_to_hf_state_dict(params, config)
    stored_dtypes = sorted({tensor.dtype.name for tensor in state.values()})
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = stored_dtypes[0] if len(stored_dtypes) == 1 else config.param_dtype

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".tmp",
                                             dir=model_dir.parent))
    try:
        with open(temp_dir / CONFIG_FILE, "w", encoding="utf-8") as file:
            json.dump(hf_config, file, indent=2, sort_keys=True)
            file.write("\n")
        # The metadata transformers itself writes: "pt" marks PyTorch's [out, in] layout.
        metadata = {"format": "pt"}
        shards = _plan_shards(state, max_shard_bytes)
        if len(shards) == 1:
            safetensors.numpy.save_file(state, temp_dir / SAFETENSORS_FILE, metadata=metadata)
        else:
            weight_map = {}
            for number, names in enumerate(shards, start=1):
                file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                safetensors.numpy.save_file({name: state[name] for name in names},
                                            temp_dir / file_name, metadata=metadata)
                weight_map.update(dict.fromkeys(names, file_name))
            index = {
                "metadata": {"total_size": int(sum(t.nbytes for t in state.values()))},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(temp_dir / SAFETENSORS_INDEX_FILE, "w", encoding="utf-8") as file:
                json.dump(index, file, indent=2)
                file.write("\n")

        if model_dir.exists():
            # Move the old folder aside first: a directory rename cannot replace a non-empty one.
            old_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".old",
                                                    dir=model_dir.parent))
            os.replace(model_dir, old_dir / model_dir.name)
            os.replace(temp_dir, model_dir)
            shutil.rmtree(old_dir)
        else:
            os.replace(temp_dir, model_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return model_dir
