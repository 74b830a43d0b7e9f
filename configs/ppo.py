"""PPO on top of a rejection-sampling (or SFT) policy, as in Llama 2-Chat (Touvron et al. 2023).

The policy starts from `policy_init`, a frozen copy of it is the reference for the KL penalty,
and the value model starts from the helpfulness reward model. The reward of a response is
R = whiten(logit(R_c)) - β KL, where R_c is the calibrated safety score for prompts tagged as
safety prompts or whose safety score is below 0.15, and the calibrated helpfulness score
otherwise. Defaults follow the paper: AdamW (β1 0.9, β2 0.95, eps 1e-5), weight decay 0.1,
gradient clipping 1.0, constant learning rate 1e-6, batches of 512 prompts split into
minibatches of 64 with one gradient step each, β = 0.01 (7B, 13B) or 0.005 (34B, 70B).

Variants (`--config=configs/ppo.py:<variant>[,smoke]`):
  tiny      a self-contained CPU run on the synthetic world of `llama_rlhf.data.synthetic`.
            `llama_rlhf.synthetic` first builds `<workdir>/setup`: a 512-piece SentencePiece
            tokenizer, a 2-layer policy fine-tuned for 400 SFT steps on answers of mixed
            quality, and helpfulness and safety reward models trained from that policy on
            comparisons of its samples labelled by the world's gold scorer. Then 40 PPO
            iterations of 64 rollouts, with evaluation on 64 held-out prompts every 4.
  7b, 13b, 34b, 70b   the paper's hyperparameters. Set `policy_init`, `tokenizer`,
            `reward_models.helpfulness`, `reward_models.safety` and the prompt files.
  smoke     an option that shrinks any variant to a few iterations (for tests).

Command (tiny, from the repository root):
  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=/tmp/ppo_tiny

Expected: 258 CPU-seconds (190 user, 68 system, by /usr/bin/time), most of them building the
setup. That run took 17 minutes of wall-clock time on 2 CPU cores shared with about 14 other
busy processes; on 2 free cores it should take an estimated 3 to 5 minutes. The reward models
rank 71% (helpfulness) and 62% (safety) of held-out pairs correctly. The held-out gated reward
R_c rises from 0.50 to 0.89 (whitened: -0.16 to +0.88) while the KL to the reference stays
below 3.5 nats per response; the gold score stays near 0.22, so the gains are partly reward
model overoptimization. Rerunning the command resumes an interrupted run.

Command (7B, on a TPU or GPU host; the paths are examples):
  python -m experiments.ppo --config=configs/ppo.py:7b --workdir=$WORKDIR \\
    --config.policy_init=$RS_MODEL --config.tokenizer=$TOKENIZER \\
    --config.reward_models.helpfulness=$HELPFULNESS_RM --config.reward_models.safety=$SAFETY_RM \\
    --config.prompts.train=$PROMPTS/train.jsonl --config.prompts.eval=$PROMPTS/eval.jsonl

Prompt files are JSON lines {"dialog": [{"role": ..., "content": ...}, ...],
"is_safety_prompt": bool}, with the last message from the user.
"""

from __future__ import annotations

import ml_collections

from llama_rlhf.training.optim import default_optimizer_config

VARIANTS = ("tiny", "7b", "13b", "34b", "70b")

# The paper's KL penalty coefficient β per model size.
_BETA = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
# Mesh per model size: FSDP over all devices, plus 8-way tensor parallelism from 34B on.
_MESH = {
    "7b": {"data": 1, "fsdp": -1, "tensor": 1},
    "13b": {"data": 1, "fsdp": -1, "tensor": 1},
    "34b": {"data": 1, "fsdp": -1, "tensor": 8},
    "70b": {"data": 1, "fsdp": -1, "tensor": 8},
}


def _base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = ""
    config.seed = 0

    # Inputs. `policy_init` is anything `training.checkpoints.load_initial_params` accepts.
    config.policy_init = ""
    config.tokenizer = ""
    config.reward_models = ml_collections.ConfigDict()
    config.reward_models.helpfulness = ""
    # Empty: no safety reward model, so R_c is the helpfulness score for every prompt.
    config.reward_models.safety = ""
    config.prompts = ml_collections.ConfigDict()
    config.prompts.train = ""
    config.prompts.eval = ""
    # Held-out prompts used per evaluation (the first ones of the eval file).
    config.prompts.num_eval = 256

    # LlamaConfig numerics for the policy, reference and value model: "dtype" (of activations)
    # and "remat_policy". Parameters and optimizer states stay in their stored dtype.
    config.model_overrides = ml_collections.ConfigDict()

    # Parallelism: sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Devices of the mesh: the first num_devices of jax.devices(), or all of them when 0.
    config.num_devices = 0

    # Rollouts.
    config.rollout = ml_collections.ConfigDict()
    config.rollout.batch_size = 512
    config.rollout.max_prompt_length = 1024
    config.rollout.max_response_length = 1024
    config.rollout.temperature = 1.0
    # Prompts per sampler call; the rollout batch is sampled in batch_size / chunk calls.
    config.rollout.sampling_batch_size = 512
    # Recompute the behaviour log-probabilities with a teacher-forced pass instead of using the
    # sampler's. Costs one policy forward pass per rollout; useful in bfloat16, where decoding
    # with a KV cache and a full forward pass round differently.
    config.rollout.recompute_logp = False

    # Reward: R = whiten(logit(R_c)) - β KL.
    config.reward = ml_collections.ConfigDict()
    config.reward.beta = 0.01
    config.reward.kl_estimator = "k1"
    config.reward.safety_threshold = 0.15
    # "metadata": whiten with the score mean and std stored with each reward model, using the
    # statistics of the model that produced R_c. "running": with running statistics of
    # logit(R_c) over all rollouts so far (checkpointed).
    config.reward.whitening = "metadata"

    # PPO update.
    config.ppo = ml_collections.ConfigDict()
    config.ppo.minibatch_size = 64
    config.ppo.epochs = 1
    config.ppo.num_microbatches = 1
    config.ppo.clip_eps = 0.2
    config.ppo.value_clip = 0.2
    config.ppo.gamma = 1.0
    config.ppo.lam = 0.95
    config.ppo.whiten_advantages = True

    # A constant learning rate without warm-up, as in the paper.
    config.optimizer = default_optimizer_config(
        learning_rate=1e-6, schedule="constant", warmup_fraction=0.0, min_warmup_steps=0
    )
    config.value_optimizer = default_optimizer_config(
        learning_rate=1e-6, schedule="constant", warmup_fraction=0.0, min_warmup_steps=0
    )

    # Loop, evaluation and early stopping on the held-out reward.
    config.num_iterations = 200
    config.eval_every = 5
    config.checkpoint_every = 5
    config.early_stopping = ml_collections.ConfigDict()
    # One of "reward_gated", "reward_whitened", "reward_helpfulness", "reward_safety".
    config.early_stopping.metric = "reward_gated"
    config.early_stopping.patience = 4
    config.early_stopping.min_delta = 0.0

    # The synthetic task of the tiny variant; unused by the other variants.
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.enabled = False
    config.synthetic.vocab_size = 512
    config.synthetic.model = ml_collections.ConfigDict(
        {
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_seq_len": 128,
        }
    )
    config.synthetic.num_train_prompts = 512
    config.synthetic.num_eval_prompts = 64
    config.synthetic.num_comparisons = 2048
    config.synthetic.reward_model_steps = 200
    config.synthetic.reward_model_batch_size = 32
    config.synthetic.reward_model_learning_rate = 1e-3
    config.synthetic.policy_sft_steps = 400
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    config.synthetic.enabled = True
    config.prompts.num_eval = 64
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.rollout.batch_size = 64
    config.rollout.sampling_batch_size = 64
    config.rollout.max_prompt_length = 32
    config.rollout.max_response_length = 64
    config.ppo.minibatch_size = 16
    # A tiny policy moves much further per step than a 7B one at lr 1e-6, so both the learning
    # rate and β are chosen for this task: the reward rises within minutes and KL stays small.
    config.optimizer.learning_rate = 1e-4
    config.value_optimizer.learning_rate = 1e-3
    config.reward.beta = 0.05
    config.num_iterations = 40
    config.eval_every = 4
    config.checkpoint_every = 4
    config.early_stopping.patience = 4


def _smoke(config: ml_collections.ConfigDict) -> None:
    config.num_iterations = 2
    config.eval_every = 1
    config.checkpoint_every = 1
    config.rollout.batch_size = min(config.rollout.batch_size, 8)
    config.rollout.sampling_batch_size = min(config.rollout.sampling_batch_size, 8)
    config.ppo.minibatch_size = min(config.ppo.minibatch_size, 4)
    config.prompts.num_eval = min(config.prompts.num_eval, 8)
    config.synthetic.num_train_prompts = 32
    config.synthetic.num_eval_prompts = 8
    config.synthetic.num_comparisons = 64
    config.synthetic.reward_model_steps = 4
    config.synthetic.reward_model_batch_size = 8
    config.synthetic.policy_sft_steps = 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config of a variant.

    Args:
      arg: "<variant>" or "<variant>,smoke", with the variant one of `VARIANTS`; "tiny" when
        None.
    """
    parts = [part.strip() for part in (arg or "tiny").split(",") if part.strip()]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS:
        raise ValueError(f"Unknown PPO variant {variant!r}; expected one of {VARIANTS}.")
    unknown = sorted(set(options) - {"smoke"})
    if unknown:
        raise ValueError(f"Unknown PPO config options {unknown}; the only option is 'smoke'.")

    config = _base_config()
    config.variant = variant
    if variant == "tiny":
        _tiny(config)
    else:
        config.reward.beta = _BETA[variant]
        config.mesh = ml_collections.ConfigDict(_MESH[variant])
        # Rollouts of 1024 + 1024 tokens: compute in bfloat16 and recompute each block in the
        # backward pass.
        config.model_overrides = ml_collections.ConfigDict(
            {"dtype": "bfloat16", "remat_policy": "full"}
        )
        # In bfloat16 the KV-cache decode and the full forward pass round differently, so the
        # behaviour log-probabilities come from the trainer's own forward pass.
        config.rollout.recompute_logp = True
    if "smoke" in options:
        _smoke(config)
    config.lock()
    return config
