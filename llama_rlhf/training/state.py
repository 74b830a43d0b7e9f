"""The train state and its creation directly in its sharded layout.

Shapes come from `jax.eval_shape`, so nothing is allocated before the shardings are known;
shardings come from the logical axis names of the parameters and the rules table in
`llama_rlhf.sharding`. The optimizer state inherits each parameter's sharding (Adam's moments
have the parameter's shape); its scalars (step counts) are replicated.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from llama_rlhf import sharding as shd
from llama_rlhf.model import Llama, LlamaConfig


class TrainState(flax.struct.PyTreeNode):
    """Everything a train step updates.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken so far.
      params: the model parameters.
      opt_state: the optimizer state.
      tx: the optax transformation (static: not an array, not checkpointed).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def apply_gradients(self, grads) -> tuple[TrainState, Any]:
        """Applies one optimizer update; returns the new state and the parameter updates."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state), updates


def boxed_param_init(config: LlamaConfig, head: str):
    """Returns rng -> parameters boxed with their logical axis names (`nn.Partitioned`)."""
    model = Llama(config, head=head)

    def init(rng):
        return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    return init


def _logical_shardings(mesh: Mesh, boxed_tree):
    """Maps a tree with `nn.Partitioned` leaves to `NamedSharding`s; unboxed leaves replicate."""
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.unbox(boxed_tree)
    return jax.tree.map(
        lambda spec, shape: shd.named_sharding(mesh, tuple(spec), tuple(shape.shape)),
        specs,
        shapes,
        is_leaf=lambda node: isinstance(node, PartitionSpec),
    )


def abstract_train_state(
    param_init, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """Computes the shapes and shardings of a train state without allocating it.

    Args:
      param_init: rng -> boxed parameters (see `boxed_param_init`); any Flax init whose
        parameters carry logical axis names works, e.g. a policy and a value model together.
      tx: the optimizer. Its state must keep the parameters' `nn.Partitioned` boxes when it
        maps over them (optax's transformations do), so moments are sharded like parameters.
      mesh: the device mesh.

    Returns:
      (abstract_state, shardings): a `TrainState` of `jax.ShapeDtypeStruct`s that carry their
      sharding (what orbax restores into), and the matching tree of `NamedSharding`s.
    """
    boxed_params = jax.eval_shape(param_init, jax.random.key(0))
    boxed_opt_state = jax.eval_shape(tx.init, boxed_params)
    shardings = TrainState(
        step=shd.replicated(mesh),
        params=_logical_shardings(mesh, boxed_params),
        opt_state=_logical_shardings(mesh, boxed_opt_state),
        tx=tx,
    )
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=nn.unbox(boxed_params),
        opt_state=nn.unbox(boxed_opt_state),
        tx=tx,
    )
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )
    return abstract, shardings


def init_train_state(
    param_init,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    params=None,
) -> tuple[TrainState, TrainState]:
    """Creates a train state in its sharded layout; see `abstract_train_state` for the args.

    With `params` (for example loaded from a checkpoint) they are moved to the parameter
    shardings and must have the shapes `param_init` produces; without, `param_init(rng)`
    initializes them, each device allocating only its own shard.
    """
    abstract, shardings = abstract_train_state(param_init, tx, mesh)

    if params is None:

        def init(key):
            params = nn.unbox(param_init(key))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), tx=tx)

        with jax.set_mesh(mesh):
            state = jax.jit(init, out_shardings=shardings)(rng)
        return state, shardings

    _check_param_shapes(params, abstract.params)
    params = jax.device_put(params, shardings.params)

    def init_from_params(params):
        params = jax.tree.map(lambda value, like: value.astype(like.dtype), params,
                              abstract.params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), tx=tx)

    with jax.set_mesh(mesh):
        state = jax.jit(init_from_params, out_shardings=shardings)(params)
    return state, shardings


def _check_param_shapes(params, expected) -> None:
    expected_paths = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
    }
    given_paths = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    missing = sorted(set(expected_paths) - set(given_paths))
    unexpected = sorted(set(given_paths) - set(expected_paths))
    if missing or unexpected:
        raise ValueError(
            f"Parameters do not match the model: missing {missing}, unexpected {unexpected}."
        )
    for path, leaf in expected_paths.items():
        shape = tuple(jnp.shape(given_paths[path]))
        if shape != tuple(leaf.shape):
            raise ValueError(
                f"Parameter {path} has shape {shape}, but the model expects {tuple(leaf.shape)}."
            )


def create_train_state(
    model_config: LlamaConfig,
    head: str,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    params=None,
) -> tuple[TrainState, TrainState]:
    """Creates the sharded train state of a `Llama(model_config, head)`.

    Returns:
      (state, state_shardings): the state and the matching tree of `NamedSharding`s, which is
      what a train step's in/out shardings and a checkpoint restore need.
    """
    return init_train_state(boxed_param_init(model_config, head), tx, mesh, rng, params)


def train_state_shardings(
    model_config: LlamaConfig, head: str, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """Returns (abstract_state, shardings) of a `Llama(model_config, head)` train state."""
    return abstract_train_state(boxed_param_init(model_config, head), tx, mesh)
