"""Creating model parameters, optionally directly sharded over a mesh."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llama_rlhf import sharding as shd
from llama_rlhf.model.config import LlamaConfig
from llama_rlhf.model.llama import Llama


def _init_fn(config: LlamaConfig, head: str):
    model = Llama(config, head=head)

    def init(rng):
        tokens = jnp.zeros((1, 1), jnp.int32)
        return model.init(rng, tokens)["params"]

    return init


def param_logical_axes(config: LlamaConfig, head: str = "lm"):
    """Returns the tree of logical axis tuples of the parameters, without allocating them."""
    boxed = jax.eval_shape(_init_fn(config, head), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: LlamaConfig, head: str = "lm"):
    """Returns the tree of `jax.ShapeDtypeStruct`s of the parameters."""
    return nn.unbox(jax.eval_shape(_init_fn(config, head), jax.random.key(0)))


def param_shardings(config: LlamaConfig, mesh: Mesh, head: str = "lm"):
    """Returns the `NamedSharding` of every parameter under the rules table."""
    axes = jax.tree.map(
        tuple,
        param_logical_axes(config, head),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    return shd.tree_shardings(mesh, axes, param_shapes(config, head))


def init_params(config: LlamaConfig, rng: jax.Array, head: str = "lm", mesh: Mesh | None = None):
    """Initializes parameters; with a mesh, each device only ever allocates its own shard."""
    init = _init_fn(config, head)
    if mesh is None:
        return nn.unbox(jax.jit(init)(rng))
    shardings = param_shardings(config, mesh, head)
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(rng)
