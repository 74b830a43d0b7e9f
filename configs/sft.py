"""Supervised fine-tuning (SFT) of a Llama model on chat dialogues.

Llama 2-Chat's SFT (Touvron et al. 2023, section 3.1): cosine learning-rate schedule with peak
2e-5, weight decay 0.1, batch size 64, sequence length 4096, 2 epochs, loss on answer tokens
only. The optimizer otherwise uses the Llama 2 AdamW settings (β1 0.9, β2 0.95, eps 1e-5,
gradient clipping 1.0, 3% warm-up of at least 5 steps, decay to 10% of the peak).

Variants (`--config=configs/sft.py:<variant>[,smoke]`):
  tiny      a CPU run: the chosen dialogues of the 2,000 shared HH-RLHF harmless-base pairs
            (10% held out with a fixed seed), the Llama 2 tokenizer, the randomly initialized
            `tiny` model, 1 epoch of 8-dialogue batches at length 256.
  7b, 13b, 70b   the paper's hyperparameters. Set `init_from` (a pretrained Llama 2:
            Hugging Face folder, llama2.c file or a model exported by this project),
            `data.tokenizer` and `data.train_files` (dialogue JSONL, format in
            llama_rlhf/sft.py).
  smoke     an option that shrinks any variant to a few steps (for tests).

Commands (from the repository root):
  python -m experiments.sft --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny

  Expected: 192 steps (252 of the 1,789 training dialogues have no answer token within 256
  tokens and are dropped). The held-out loss falls from 10.4 nats per answer token (ln 32000,
  a uniform guess) to 6.07, next-token accuracy 16%. Measured: 21 minutes on 2 CPU cores
  shared with five other jobs, 5 minutes of CPU time (user + system), so an estimated 3 minutes
  on 2 idle cores.

  python -m experiments.sft --config=configs/sft.py:7b --workdir=$WORKDIR \\
    --config.init_from=$LLAMA2_7B --config.data.tokenizer=$LLAMA2_7B \\
    --config.data.train_files=$DATA/sft_train.jsonl --config.data.eval_files=$DATA/sft_eval.jsonl

The trained model is exported to `<workdir>/model`. Rerunning a command with the same workdir
resumes an interrupted run with the same data order.
"""

from __future__ import annotations

import ml_collections

from llama_rlhf.paths import shared_dir
from llama_rlhf.training.loop import default_loop_config
from llama_rlhf.training.optim import default_optimizer_config

VARIANTS = ("tiny", "7b", "13b", "70b")

# Mesh per model size: parameters are sharded (FSDP) over every device. The 70B model also
# splits its 64 query and 8 key/value heads over a tensor axis of 8.
_MESH = {
    "7b": {"data": 1, "fsdp": -1, "tensor": 1},
    "13b": {"data": 1, "fsdp": -1, "tensor": 1},
    "70b": {"data": 1, "fsdp": -1, "tensor": 8},
}


def _base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = ""
    config.seed = 0

    # The starting point: anything `training.checkpoints.load_initial_params` accepts, e.g. a
    # Hugging Face Llama 2 folder, a model exported by this project, or "random:<variant>".
    config.init_from = ""
    # LlamaConfig fields to change. For "random:<variant>" any field; for a checkpoint only
    # fields that keep parameter shapes (dtype, param_dtype, remat_policy).
    config.model_overrides = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    # A SentencePiece tokenizer.model file or a Hugging Face tokenizer folder.
    config.data.tokenizer = ""
    # Dialogue JSONL files ({"messages": [...]} per line); comma-separated or a tuple.
    config.data.train_files = ""
    config.data.eval_files = ""
    # An Anthropic HH-RLHF JSONL file whose chosen transcripts become dialogues (optional,
    # read before `train_files`), and its subset name.
    config.data.hh_rlhf_path = ""
    config.data.hh_rlhf_subset = "harmless-base"
    # Without eval files, this fraction of the dialogues is held out at random with
    # `split_seed` (0: no evaluation).
    config.data.eval_fraction = 0.0
    config.data.split_seed = 0
    # Use only the first `limit` dialogues read (0: all).
    config.data.limit = 0
    # Skip malformed records (counted in the log) instead of stopping at the first one.
    config.data.skip_invalid = False
    # Sequence length in tokens; longer dialogues keep their first max_length tokens when
    # `truncate`, and raise an error otherwise.
    config.data.max_length = 4096
    config.data.truncate = True

    # Dialogues per optimizer step (also per evaluation batch).
    config.batch_size = 64
    config.num_epochs = 2
    # Total optimizer steps; 0 means num_epochs epochs.
    config.num_steps = 0
    config.optimizer = default_optimizer_config(learning_rate=2e-5)
    # Sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # Use the first `num_devices` devices (0: all).
    config.num_devices = 0
    config.loop = default_loop_config(log_every=10, eval_every=200, checkpoint_every=500)
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    shared = shared_dir()
    config.init_from = "random:tiny"
    config.model_overrides = ml_collections.ConfigDict({"dtype": "float32"})
    config.data.tokenizer = str(shared / "models" / "llama2-tokenizer" / "tokenizer.model")
    config.data.hh_rlhf_path = str(shared / "data" / "hh-rlhf" / "harmless-base-2000.jsonl.gz")
    config.data.eval_fraction = 0.1
    # A few of the real HH-RLHF transcripts break the dialogue format.
    config.data.skip_invalid = True
    config.data.max_length = 256
    config.batch_size = 8
    config.num_epochs = 1
    # A randomly initialized model needs a far larger learning rate than a pretrained one.
    config.optimizer.learning_rate = 1e-3
    config.loop.log_every = 20
    config.loop.eval_every = 112
    config.loop.checkpoint_every = 112


def _paper(config: ml_collections.ConfigDict, variant: str) -> None:
    config.mesh = ml_collections.ConfigDict(_MESH[variant])
    # Compute in bfloat16 and recompute each block in the backward pass to fit 4096 tokens;
    # parameters and optimizer state stay float32.
    config.model_overrides = ml_collections.ConfigDict(
        {"dtype": "bfloat16", "remat_policy": "full"})


def _smoke(config: ml_collections.ConfigDict) -> None:
    config.data.limit = 40
    config.data.max_length = min(config.data.max_length, 128)
    config.batch_size = 4
    config.num_steps = 4
    config.loop.log_every = 1
    config.loop.eval_every = 2
    config.loop.checkpoint_every = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config of a variant.

    Args:
      arg: "<variant>" or "<variant>,smoke", with the variant one of `VARIANTS`; "tiny" when
        None.
    """
    parts = [part.strip() for part in (arg or "tiny").split(",") if part.strip()]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS:
        raise ValueError(f"Unknown SFT variant {variant!r}; expected one of {VARIANTS}.")
    unknown = sorted(set(options) - {"smoke"})
    if unknown:
        raise ValueError(f"Unknown SFT config options {unknown}; the only option is 'smoke'.")

    config = _base_config()
    config.variant = variant
    if variant == "tiny":
        _tiny(config)
    else:
        _paper(config, variant)
    if "smoke" in options:
        _smoke(config)
    config.lock()
    return config
