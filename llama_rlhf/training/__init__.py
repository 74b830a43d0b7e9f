"""Training machinery shared by every stage: optimizer, train state, checkpoints, metrics, loop."""

from llama_rlhf.training.checkpoints import (
    Checkpointer,
    LoadedModel,
    convert_head,
    initial_model_config,
    load_initial_params,
    load_model,
    save_model,
)
from llama_rlhf.training.loop import (
    DataOrder,
    LoopResult,
    PerformanceMeter,
    default_loop_config,
    evaluate,
    make_eval_step,
    make_train_step,
    shard_batch,
    train_loop,
)
from llama_rlhf.training.metrics import MetricWriter, read_metrics, reduce_metrics, save_config
from llama_rlhf.training.optim import (
    decay_mask,
    default_optimizer_config,
    make_optimizer,
    make_schedule,
)
from llama_rlhf.training.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    init_train_state,
    train_state_shardings,
)

__all__ = [
    "Checkpointer",
    "DataOrder",
    "LoadedModel",
    "LoopResult",
    "MetricWriter",
    "PerformanceMeter",
    "TrainState",
    "abstract_train_state",
    "convert_head",
    "create_train_state",
    "decay_mask",
    "default_loop_config",
    "default_optimizer_config",
    "evaluate",
    "init_train_state",
    "initial_model_config",
    "load_initial_params",
    "load_model",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "read_metrics",
    "reduce_metrics",
    "save_config",
    "save_model",
    "shard_batch",
    "train_loop",
    "train_state_shardings",
]
