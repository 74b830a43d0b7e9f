"""Ghost Attention (GAtt): fine-tuning a chat model to keep following a first-turn instruction.

Llama 2 (Touvron et al. 2023, arXiv:2307.09288, section 3.3 and appendix A.3.5) concatenates an
instruction to every user message of multi-turn dialogues, samples the answers from the latest
RLHF model, then keeps the instruction only in the first turn, sets the loss to zero on every
token of earlier turns and fine-tunes on the result. Its instructions combine hobbies ("You
enjoy ..."), languages ("Speak in ...") and public figures ("Act as ..."), shortened half of
the time ("Figure: Napoleon."). The algorithm is in llama_rlhf/ghost_attention.py.

Choices the paper does not fix, and what they are here:
  * Checkable constraints (capital or lower case letters, a last or first word, a banned
    letter, a language told apart by word lists) join the paper's kinds, so a program measures
    instruction following per turn (`evaluation`), like the human evaluation of the paper's
    Table 30.
  * Each turn draws `sampling.num_samples` samples and keeps the first that ends with EOS and
    follows the checkable constraints (`rejection`); a dialogue ends at a turn where none does.
  * `examples`: "last" (one example per dialogue, its last answer learned) for the paper
    variants, as the paper describes; "every_turn" for the tiny run, which learns every turn's
    answer in its own example and so gets more signal out of few dialogues.
  * Fine-tuning uses the SFT stage's settings for the same model size (`finetune`).

Variants (`--config=configs/ghost_attention.py:<variant>[,smoke]`):
  tiny      a self-contained CPU run on the synthetic world (llama_rlhf/data/synthetic.py):
            a 768-piece tokenizer, then a base policy (the `tiny` Llama shape) fine-tuned on
            4,000 dialogues in which an instruction governs only its own turn, then GAtt on
            256 dialogues of 2 to 20 turns, and an evaluation on 100 dialogues of 2 to 20
            turns before and after.
  7b, 13b, 70b   the paper's setting. Set `policy_init` (the latest RLHF model), `tokenizer`,
            `data.dialogues` and `evaluation.dialogues` (dialogue JSONL as for
            configs/sft.py; only the user messages are used).
  smoke     an option that shrinks any variant to a few dialogues and steps (for tests).

Command (tiny, from the repository root):
  python -m experiments.ghost_attention --config=configs/ghost_attention.py:tiny \\
    --workdir=/tmp/gatt_tiny

Expected: 17 minutes on 2 CPU cores shared with other jobs (load average about 4), and about
50 minutes under a load average of 15. Measured result: the base policy follows the
instruction in 78% of first turns and in 0.0% of answers at turns >= 4; after GAtt, 83% of
first turns and 63.9% of answers at turns >= 4, with 50% to 78% at every turn up to 20. The
2-layer model does not tell "friend" from "goodbye" as a last word, so after GAtt it ends
every such answer with "goodbye". `<workdir>/report.md` contains the per-turn table,
`following_by_turn.png` the plot, `gatt_data.jsonl` the training dialogues and `model/` the
new policy. Rerunning the command resumes an interrupted run.

Command (70B, on a TPU or GPU host; the paths are examples):
  python -m experiments.ghost_attention --config=configs/ghost_attention.py:70b \\
    --workdir=$WORKDIR --config.policy_init=$RLHF_V5_70B --config.tokenizer=$TOKENIZER \\
    --config.data.dialogues=$DATA/multi_turn_train.jsonl \\
    --config.evaluation.dialogues=$DATA/multi_turn_eval.jsonl
"""

from __future__ import annotations

import ml_collections

from configs import sft as sft_configs
from llama_rlhf import ghost_attention as gatt

VARIANTS = ("tiny", "7b", "13b", "70b")


def _base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = ""
    config.seed = 0

    # The latest policy, which samples the answers and is fine-tuned: anything
    # `training.checkpoints.load_initial_params` accepts. Empty in the tiny run: a base
    # policy is fine-tuned first.
    config.policy_init = ""
    config.tokenizer = ""
    # "last": one example per dialogue, its last answer learned; "every_turn": one example
    # per turn, each learning that turn's answer.
    config.examples = "last"
    # Where the training data and the evaluation put the instruction: "first_user" in front
    # of the first user message, "system" as a system message.
    config.placement = "first_user"

    # Sampling mesh: sizes of the (data, fsdp, tensor) axes, -1 takes the remaining devices,
    # over the first `num_devices` devices (0: all).
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.num_devices = 0

    config.data = ml_collections.ConfigDict()
    # Dialogue JSONL whose user messages GAtt answers anew.
    config.data.dialogues = ""
    # Use the first `max_dialogues` dialogues (0: all) and their first `max_turns` user
    # turns (0: all).
    config.data.max_dialogues = 0
    config.data.max_turns = 0

    config.instructions = ml_collections.ConfigDict()
    # Kind -> sampling weight of GAtt's training instructions; 0 turns a kind off.
    config.instructions.kind_weights = ml_collections.ConfigDict(
        {kind: 1.0 for kind in gatt.CONSTRAINT_KINDS})
    config.instructions.hobbies = gatt.DEFAULT_HOBBIES
    config.instructions.languages = gatt.DEFAULT_LANGUAGES
    config.instructions.figures = gatt.DEFAULT_FIGURES
    config.instructions.end_words = ("friend", "goodbye", "thank you")
    config.instructions.start_words = ("well", "indeed")
    config.instructions.avoided_letters = ("e", "a")
    # An instruction combines 1 to max_constraints constraints of different kinds.
    config.instructions.max_constraints = 3
    # The chance that the training data writes the instruction in its short form.
    config.instructions.shorten_probability = 0.5
    # Word lists that make "language" constraints checkable (empty: not checkable).
    config.instructions.language_words = ml_collections.ConfigDict(
        dict(gatt.DEFAULT_LANGUAGE_WORDS))
    config.instructions.min_language_fraction = 0.2

    config.sampling = ml_collections.ConfigDict()
    # Samples per turn; the first one that passes `rejection` is kept.
    config.sampling.num_samples = 4
    config.sampling.temperature = 1.0
    # 0: no top-k filtering; 1.0: no nucleus filtering.
    config.sampling.top_k = 0
    config.sampling.top_p = 0.9
    config.sampling.max_new_tokens = 1024
    # A dialogue ends before a turn whose prompt has more tokens.
    config.sampling.max_prompt_length = 3072
    # Dialogues per sampler call, and per resumable shard of sampled dialogues.
    config.sampling.batch_size = 64

    config.rejection = ml_collections.ConfigDict()
    # Keep only samples that follow the checkable constraints of the instruction.
    config.rejection.use_checker = True
    # Keep only samples that end with EOS.
    config.rejection.require_eos = True

    config.evaluation = ml_collections.ConfigDict()
    # Dialogue JSONL of the evaluation (its user messages are used).
    config.evaluation.dialogues = ""
    # Evaluate on the first `num_dialogues` dialogues (0: all); the synthetic run draws
    # that many of `min_turns` to `max_turns` turns. Longer dialogues keep `max_turns`.
    config.evaluation.num_dialogues = 0
    config.evaluation.min_turns = 2
    config.evaluation.max_turns = 20
    # Kind -> weight of the evaluation's instructions; only checkable kinds are drawn.
    config.evaluation.kind_weights = ml_collections.ConfigDict(
        {kind: 1.0 for kind in gatt.ALWAYS_CHECKABLE + ("language",)})
    config.evaluation.seed = 1
    config.evaluation.max_new_tokens = 512
    config.evaluation.max_prompt_length = 3584
    config.evaluation.batch_size = 64

    # The synthetic world of the tiny run; unused otherwise.
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.enabled = False
    config.synthetic.world_seed = 0
    config.synthetic.num_animals = 8
    config.synthetic.vocab_size = 768
    config.synthetic.num_gatt_dialogues = 256
    config.synthetic.gatt_min_turns = 2
    config.synthetic.gatt_max_turns = 20
    config.synthetic.gatt_seed = 2
    return config


def _finetune_config(variant: str) -> ml_collections.ConfigDict:
    """Return the SFT stage's config of the same size, unlocked; its data fields are unused."""
    config = sft_configs.get_config(variant)
    config.unlock()
    return config


def _tiny(config: ml_collections.ConfigDict) -> None:
    config.synthetic.enabled = True
    config.examples = "every_turn"
    config.num_devices = 1
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})

    # The synthetic world has no French and no words without the letter e: the checkable
    # kinds are those that `rewrite_to_follow` can impose on the base policy's data.
    instructions = config.instructions
    instructions.kind_weights = ml_collections.ConfigDict({
        "hobby": 1.0, "figure": 1.0, "language": 0.0, "capitals": 1.0, "lower_case": 1.0,
        "ends_with": 2.0, "starts_with": 2.0, "avoid_letter": 0.0})
    instructions.end_words = ("friend", "goodbye")
    instructions.start_words = ("well", "arr")
    instructions.max_constraints = 2
    config.evaluation.kind_weights = ml_collections.ConfigDict({
        "capitals": 1.0, "lower_case": 1.0, "ends_with": 2.0, "starts_with": 2.0})

    config.sampling.num_samples = 4
    config.sampling.temperature = 0.7
    config.sampling.top_p = 1.0
    config.sampling.max_new_tokens = 48
    config.sampling.max_prompt_length = 768
    config.sampling.batch_size = 64

    config.evaluation.num_dialogues = 100
    config.evaluation.max_new_tokens = 48
    config.evaluation.max_prompt_length = 960
    config.evaluation.batch_size = 80

    # The base policy: the `tiny` Llama shape with the synthetic tokenizer's vocabulary,
    # fine-tuned from random weights on dialogues where an instruction governs its own turn.
    config.base_policy = ml_collections.ConfigDict()
    config.base_policy.num_dialogues = 4000
    config.base_policy.min_turns = 1
    config.base_policy.max_turns = 20
    config.base_policy.instruction_probability = 0.3
    config.base_policy.seed = 3
    base = _finetune_config("tiny")
    base.init_from = "random:tiny"
    base.model_overrides = ml_collections.ConfigDict({
        "dtype": "float32", "vocab_size": config.synthetic.vocab_size, "max_seq_len": 2048})
    base.data.hh_rlhf_path = ""
    base.data.eval_fraction = 0.0
    # About 96% of these dialogues fit in 640 tokens; the SFT stage cuts the longer ones.
    base.data.max_length = 640
    base.batch_size = 8
    base.num_epochs = 0
    base.num_steps = 400
    base.optimizer.learning_rate = 3e-3
    base.num_devices = 1
    base.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    base.loop.log_every = 50
    base.loop.eval_every = 0
    base.loop.checkpoint_every = 100
    config.base_policy.sft = base

    finetune = config.finetune
    finetune.model_overrides = ml_collections.ConfigDict()
    finetune.data.hh_rlhf_path = ""
    finetune.data.eval_fraction = 0.0
    # Nearly all GAtt examples fit; the few longer ones (long capital-letter answers) are
    # dropped.
    finetune.data.max_length = 640
    finetune.batch_size = 16
    finetune.num_epochs = 1
    finetune.optimizer.learning_rate = 1e-3
    finetune.num_devices = 1
    finetune.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    finetune.loop.log_every = 25
    finetune.loop.eval_every = 0
    finetune.loop.checkpoint_every = 50


def _paper(config: ml_collections.ConfigDict) -> None:
    # Sample on the SFT stage's mesh of the same size (the 70B model needs tensor
    # parallelism).
    config.mesh = ml_collections.ConfigDict(config.finetune.mesh.to_dict())


def _smoke(config: ml_collections.ConfigDict) -> None:
    config.sampling.num_samples = min(config.sampling.num_samples, 2)
    config.sampling.max_new_tokens = min(config.sampling.max_new_tokens, 16)
    config.sampling.batch_size = 4
    config.data.max_dialogues = 4
    config.evaluation.num_dialogues = 4
    config.evaluation.max_turns = 3
    config.evaluation.max_new_tokens = min(config.evaluation.max_new_tokens, 16)
    config.evaluation.batch_size = 4
    config.synthetic.num_gatt_dialogues = 4
    config.synthetic.gatt_max_turns = 3
    config.finetune.batch_size = 2
    config.finetune.num_epochs = 1
    config.finetune.num_steps = 2
    config.finetune.loop.log_every = 1
    config.finetune.loop.checkpoint_every = 1
    # A policy trained for a few steps rarely follows an instruction or stops with EOS, so
    # every sample is kept.
    config.rejection.use_checker = False
    config.rejection.require_eos = False
    if "base_policy" in config:
        config.base_policy.num_dialogues = 8
        config.base_policy.max_turns = 3
        config.base_policy.sft.num_steps = 3
        config.base_policy.sft.batch_size = 2
        config.base_policy.sft.loop.log_every = 1
        config.base_policy.sft.loop.checkpoint_every = 3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Return the locked config of a variant.

    Args:
      arg: "<variant>" or "<variant>,smoke", with the variant one of `VARIANTS`; "tiny" when
        None.
    """
    parts = [part.strip() for part in (arg or "tiny").split(",") if part.strip()]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS:
        raise ValueError(f"Unknown Ghost Attention variant {variant!r}; expected one of "
                         f"{VARIANTS}.")
    unknown = sorted(set(options) - {"smoke"})
    if unknown:
        raise ValueError(f"Unknown Ghost Attention config options {unknown}; the only option "
                         "is 'smoke'.")

    config = _base_config()
    config.variant = variant
    config.finetune = _finetune_config(variant)
    if variant == "tiny":
        _tiny(config)
    else:
        _paper(config)
    if "smoke" in options:
        _smoke(config)
    config.lock()
    return config
