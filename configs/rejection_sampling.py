"""Rejection-sampling fine-tuning, as in Llama 2-Chat's iterative RLHF.

Llama 2 (Touvron et al. 2023, arXiv:2307.09288, section 3.2.3) samples K answers per prompt
from the latest model, scores them with the best reward model available, keeps the best answer
per prompt and fine-tunes on those answers like SFT. After RLHF V3, the selection also pooled
the best answers of all earlier iterations, because selecting only among the newest samples
caused regressions. Only the 70B model was sampled, and the 7B and 13B models were fine-tuned
on the 70B model's selections.

Sampling choices and their source:
  * temperature 1.2: section 3.2.3 reports T in [1.2, 1.3] as the best temperature for an
    RLHF model when sampling 10 to 100 outputs (Figure 8), and that the best temperature moves
    as the model changes. An SFT model may want a lower one.
  * K = 10: the paper does not state the K of its training runs; its best-of-N figures span
    N = 1..100. K = 10 is the lower end of the range for which the temperature was tuned.
    Raise `sampling.num_samples` when the best-of-N curve has not flattened at N = K.
  * Fine-tuning uses the SFT stage's settings of `configs/sft.py` for the same model size; the
    paper says only that the fine-tuning is similar to SFT.
  * Pooling with earlier selections is on, with every pooled answer rescored by the current
    reward models, because scores of different reward-model versions are not comparable.

Variants (`--config=configs/rejection_sampling.py:<variant>[,smoke]`):
  tiny      a self-contained CPU run. It builds the synthetic setup of the PPO stage in
            `<workdir>/setup` (a SentencePiece tokenizer, a tiny policy, and helpfulness and
            safety reward models trained on synthetic comparisons), then samples K = 8
            answers for 128 prompts, selects, fine-tunes, and measures the initial and the
            fine-tuned policy with the world's gold scorer.
  7b, 13b, 70b   the paper's settings. Set `policy_init`, `tokenizer`,
            `reward_models.helpfulness`, `reward_models.safety` and `prompts`; for 7b and 13b
            also `sampling_policy`, the 70B model that samples.
  smoke     an option that shrinks any variant to a few prompts and steps (for tests).

Command (tiny, from the repository root):
  python -m experiments.rejection_sampling --config=configs/rejection_sampling.py:tiny \\
    --workdir=/tmp/rs_tiny

Expected: 12 to 22 minutes on 2 CPU cores shared with other jobs (measured 12m16s and 21m45s
wall), almost all of it building the synthetic setup (a 400-step SFT policy and two reward
models of about 200 to 300 steps). Sampling, selection and fine-tuning take under a minute.
Measured with seed 0 (105 distinct prompts of the 128 drawn, K = 8), the expected best gated
reward among N samples rises with N while the median stays nearly flat:
    N        1      2      3      4      5      6      7      8
    max    0.568  0.768  0.853  0.894  0.916  0.927  0.934  0.939
    median 0.568  0.568  0.597  0.597  0.612  0.612  0.618  0.618
The world's gold scorer agrees that selection helps: the selected answers score 0.292 against
0.208 for all samples (unsafe answers 1.0% against 4.9%), and on 64 held-out prompts (8
samples each) the fine-tuned policy scores 0.215 against 0.196 for the initial one (unsafe
4.3% against 6.3%). `<workdir>/best_of_n.json` and `best_of_n.png` hold the curves,
`selected.jsonl` the selected answers, `evaluation.json` the gold scores and `model/` the
fine-tuned policy. Rerunning the command resumes an interrupted run.

Command (70B, on a TPU or GPU host; the paths are examples):
  python -m experiments.rejection_sampling --config=configs/rejection_sampling.py:70b \\
    --workdir=$WORKDIR --config.iteration=4 --config.policy_init=$RLHF_V3_70B \\
    --config.tokenizer=$TOKENIZER --config.reward_models.helpfulness=$HELPFULNESS_RM \\
    --config.reward_models.safety=$SAFETY_RM --config.prompts=$PROMPTS/train.jsonl \\
    --config.previous_selections=$V1/selected.jsonl,$V2/selected.jsonl,$V3/selected.jsonl

Prompt files are JSON lines {"dialog": [{"role": ..., "content": ...}, ...],
"is_safety_prompt": bool}, with the last message from the user (as for `configs/ppo.py`).
"""

from __future__ import annotations

import ml_collections

from configs import ppo as ppo_configs
from configs import sft as sft_configs

VARIANTS = ("tiny", "7b", "13b", "70b")


def _base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = ""
    config.seed = 0
    # The RLHF version this run produces; stored with every selected answer and folded into
    # the sampling randomness.
    config.iteration = 1

    # Inputs. `policy_init` is the policy to fine-tune: anything
    # `training.checkpoints.load_initial_params` accepts.
    config.policy_init = ""
    # The model that samples; empty: `policy_init`.
    config.sampling_policy = ""
    config.tokenizer = ""
    config.reward_models = ml_collections.ConfigDict()
    config.reward_models.helpfulness = ""
    # Empty: no safety reward model, so the score is σ(helpfulness score) for every prompt.
    config.reward_models.safety = ""
    # Prompt JSONL file (format in the module docstring).
    config.prompts = ""
    # Use only the first `max_prompts` prompts (0: all).
    config.max_prompts = 0
    # Comma-separated `selected.jsonl` files of earlier iterations, oldest first.
    config.previous_selections = ""

    # Sampling mesh: sizes of the (data, fsdp, tensor) axes, -1 takes the remaining devices,
    # over the first `num_devices` devices (0: all).
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.num_devices = 0

    config.sampling = ml_collections.ConfigDict()
    # K, the samples per prompt.
    config.sampling.num_samples = 10
    config.sampling.temperature = 1.2
    # 0: no top-k filtering; 1.0: no nucleus filtering.
    config.sampling.top_k = 0
    config.sampling.top_p = 1.0
    # Prompts with more tokens are dropped (and counted in the log).
    config.sampling.max_prompt_length = 1024
    config.sampling.max_new_tokens = 1024
    # Prompts per sampler call; each call generates prompt_batch_size * num_samples rows.
    config.sampling.prompt_batch_size = 64
    # Sequences per reward-model forward pass.
    config.sampling.score_batch_size = 64
    # Store the text of all K samples in the batch files, not only the selected one.
    config.sampling.save_all_responses = False

    config.selection = ml_collections.ConfigDict()
    # Llama 2's gate: the safety score decides when it is below this (after a sigmoid).
    config.selection.safety_threshold = 0.15
    # Samples without EOS (cut at max_new_tokens) cannot be selected.
    config.selection.skip_unfinished = True
    # Keep the best answer per prompt over this run and `previous_selections`.
    config.selection.pool_previous = True
    # Rescore pooled answers with this run's reward models; off: compare stored scores.
    config.selection.rescore_previous = True

    # The synthetic task of the tiny variant, built by `llama_rlhf.synthetic`; unused otherwise.
    config.synthetic = _synthetic_config("tiny")
    config.synthetic.enabled = False
    return config


def _synthetic_config(arg: str) -> ml_collections.ConfigDict:
    """Returns an unlocked copy of the PPO stage's synthetic setup settings, so that both
    stages build the same kind of tiny policy and reward models."""
    return ml_collections.ConfigDict(ppo_configs.get_config(arg).synthetic.to_dict())


def _finetune_config(variant: str) -> ml_collections.ConfigDict:
    """Returns the SFT stage's config of the same size, unlocked. Its data fields are unused,
    because the examples are the selected answers."""
    config = sft_configs.get_config(variant)
    config.unlock()
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    config.synthetic.enabled = True
    config.synthetic.num_train_prompts = 128
    # Held-out prompts on which the initial and the fine-tuned policy are compared.
    config.synthetic.num_eval_prompts = 64
    config.sampling.num_samples = 8
    # A tiny SFT policy is far from an RLHF one; 1.0 keeps its samples fluent.
    config.sampling.temperature = 1.0
    config.sampling.max_prompt_length = 48
    config.sampling.max_new_tokens = 48
    config.sampling.prompt_batch_size = 32
    config.sampling.score_batch_size = 64
    config.sampling.save_all_responses = True
    finetune = config.finetune
    finetune.data.max_length = 96
    finetune.batch_size = 16
    finetune.num_epochs = 2
    finetune.optimizer.learning_rate = 3e-4
    finetune.loop.log_every = 4
    finetune.loop.eval_every = 0
    finetune.loop.checkpoint_every = 8


def _smoke(config: ml_collections.ConfigDict) -> None:
    config.max_prompts = 8
    config.sampling.num_samples = min(config.sampling.num_samples, 4)
    config.sampling.max_new_tokens = min(config.sampling.max_new_tokens, 8)
    config.sampling.prompt_batch_size = 4
    config.finetune.batch_size = 2
    config.finetune.num_epochs = 1
    config.finetune.num_steps = 2
    config.finetune.loop.log_every = 1
    config.finetune.loop.checkpoint_every = 1
    enabled = config.synthetic.enabled
    config.synthetic = _synthetic_config("tiny,smoke")
    config.synthetic.enabled = enabled
    config.synthetic.num_train_prompts = 8
    config.synthetic.num_eval_prompts = 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config of a variant.

    Args:
      arg: "<variant>" or "<variant>,smoke", with the variant one of `VARIANTS`; "tiny" when
        None.
    """
    parts = [part.strip() for part in (arg or "tiny").split(",") if part.strip()]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS:
        raise ValueError(f"Unknown rejection-sampling variant {variant!r}; expected one of "
                         f"{VARIANTS}.")
    unknown = sorted(set(options) - {"smoke"})
    if unknown:
        raise ValueError(f"Unknown rejection-sampling config options {unknown}; the only option "
                         "is 'smoke'.")

    config = _base_config()
    config.variant = variant
    config.finetune = _finetune_config(variant)
    if variant == "tiny":
        _tiny(config)
    else:
        # Sample on the SFT stage's mesh of the same size (the 70B model needs tensor
        # parallelism).
        config.mesh = ml_collections.ConfigDict(config.finetune.mesh.to_dict())
    if "smoke" in options:
        _smoke(config)
    config.lock()
    return config
