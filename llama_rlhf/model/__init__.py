"""The Llama 2 model, its configuration and checkpoint conversion."""

from llama_rlhf.model.config import VARIANTS, LlamaConfig, get_variant
from llama_rlhf.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from llama_rlhf.model.llama import KVCache, Llama, positions_from_mask
from llama_rlhf.model.llama2c_checkpoint import load_llama2c_checkpoint
from llama_rlhf.model.params import (
    init_params,
    param_logical_axes,
    param_shapes,
    param_shardings,
)

__all__ = [
    "VARIANTS",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "get_variant",
    "init_params",
    "load_hf_checkpoint",
    "load_llama2c_checkpoint",
    "param_logical_axes",
    "param_shapes",
    "param_shardings",
    "positions_from_mask",
    "save_hf_checkpoint",
]
