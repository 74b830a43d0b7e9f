"""The iterative RLHF loop of Llama 2-Chat: SFT, then RLHF versions V1 ... Vn.

Llama 2-Chat (Touvron et al. 2023, arXiv:2307.09288, sections 3.2 and 3.3) was aligned in
rounds: each week new preference comparisons were collected on answers of the latest models,
the helpfulness and safety reward models were retrained on all comparisons collected so far,
and a new RLHF version was trained and evaluated. Versions V1 to V4 used rejection-sampling
fine-tuning; V5 added PPO on top of it; Ghost Attention was applied from RLHF V3 on. The loop
is in llama_rlhf/rlhf_loop.py; each version runs, in its own folder of the workdir:

  comparisons -> reward_helpfulness, reward_safety -> rejection_sampling
  -> ppo (from `ppo_from_version` on) -> ghost_attention (from
  `ghost_attention_from_version` on) -> eval

Every stage reuses the stage module's own config (`sft`, `reward_model`,
`rejection_sampling`, `ppo`, `ghost_attention` are configs of configs/sft.py,
configs/reward_model.py and so on); the loop sets only what changes per version (the
iteration, the reward-model kind, the inputs).

Choices the paper does not fix, and what they are here:
  * Simulated annotator: both answers of a pair are sampled from the latest policy, one at
    each of `comparisons.temperatures`. Meta sampled from different model variants and
    temperatures; two temperatures of one model give pairs of different quality without a
    second model in memory.
  * The reward models of version k are trained on the comparisons of versions 1..k, minus the
    held-out part of version k, on which they are evaluated (Meta retrained on all data
    collected so far). They start from the latest policy with a fresh scalar head
    (`reward_model_init` "policy"), as Meta starts reward models from a chat model checkpoint;
    "previous" starts from the previous version's reward model of the same kind, "sft" from
    the SFT model.
  * Rejection sampling pools the best answers of all earlier versions (its
    `selection.pool_previous`), as Llama 2 did from RLHF V4 on.
  * Evaluation answers are sampled at `evaluation.temperature` with a fixed key, so the KL to
    SFT is an estimate of KL(π_version ‖ π_SFT) of the tempered distributions.

Variants (`--config=configs/rlhf.py:<variant>[,smoke]`):
  tiny      offline on a fresh machine: the synthetic world of llama_rlhf/data/synthetic.py
            (4 animals), its SentencePiece tokenizer, a tiny Llama fine-tuned on the world's
            demonstrations of mixed quality, and the simulated annotator (the world's gold
            scorer). 3 versions, Ghost Attention from V2, PPO from V3.
  hh_rlhf   real human comparisons: the HH-RLHF harmless-base pairs of the shared data folder,
            split across 2 versions by the file annotator, the Llama 2 tokenizer, and a tiny
            randomly initialised Llama fine-tuned on the chosen transcripts. Prompts for
            sampling are the contexts of the comparisons. No gold annotator exists for these.
  smoke     an option that shrinks any variant to a few prompts and steps (for tests).

Commands (from the repository root):
  python -m experiments.rlhf --config=configs/rlhf.py:tiny --workdir=/tmp/rlhf_tiny
  python -m experiments.rlhf --config=configs/rlhf.py:hh_rlhf --workdir=/tmp/rlhf_hh

Expected (tiny), as measured on a 2-core machine shared with other jobs: the mean gold score of
the answers to 256 held-out prompts rises from 0.515 (SFT) to 0.595, 0.637 and 0.667 (V1 to V3),
and V3 beats SFT with win rates of 77.6% by the reward models and 68.4% by the gold annotator.
The run used 358 s of CPU time (user + system) and took 9 min 23 s of wall-clock time from an
empty workdir while other jobs kept the load average at 4 to 6 (two runs gave the same numbers).
`<workdir>/report.md` contains the tables and plots, and the end of the log prints a one-screen
summary. Rerunning a command continues where it stopped and never redoes a finished stage.
"""

from __future__ import annotations

import ml_collections

from configs import ghost_attention as gatt_configs
from configs import ppo as ppo_configs
from configs import rejection_sampling as rs_configs
from configs import reward_model as rm_configs
from configs import sft as sft_configs
from llama_rlhf import annotators
from llama_rlhf.paths import shared_dir

VARIANTS = ("tiny", "hh_rlhf")

_SINGLE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.unlock()
    return config


def _one_device(config: ml_collections.ConfigDict) -> None:
    """Runs a stage on the first device only: the tiny models gain nothing from sharding."""
    config.mesh = ml_collections.ConfigDict(_SINGLE_DEVICE)
    if "num_devices" in config:
        config.num_devices = 1


def _base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = ""
    config.seed = 0

    # RLHF versions V1 ... Vn, and the first version that runs PPO after rejection sampling,
    # and Ghost Attention after both (0: never).
    config.num_versions = 3
    config.ppo_from_version = 3
    config.ghost_attention_from_version = 2
    # Where the reward models of a version start: "policy" (the latest policy with a fresh
    # scalar head), "previous" (the previous version's model of the same kind) or "sft".
    config.reward_model_init = "policy"
    # The policy that rejection sampling fine-tunes on the selected answers: "latest" (the
    # policy that sampled them) or "sft" (the SFT model, refit on the answers pooled over all
    # versions so far, so that fine-tuning errors do not compound from version to version).
    config.rejection_sampling_init = "latest"

    # A SentencePiece tokenizer.model file or a Hugging Face tokenizer folder; unused with the
    # synthetic world, which trains its own.
    config.tokenizer = ""

    # The synthetic world of the tiny variant (llama_rlhf/data/synthetic.py).
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.enabled = False
    config.synthetic.world_seed = 0
    config.synthetic.num_animals = 8
    config.synthetic.vocab_size = 512
    # SFT demonstrations: single-turn answers of mixed quality, a share of them to safety
    # prompts, and a share that starts with one of the world's instructions.
    config.synthetic.num_sft_dialogues = 8192
    config.synthetic.safety_fraction = 0.25
    config.synthetic.instruction_fraction = 0.1
    # Multi-turn SFT dialogues in which an instruction governs only its own turn
    # (`ghost_attention.instruction_sft_dialogues`), so that the policy can follow an
    # instruction that Ghost Attention then teaches it to keep.
    config.synthetic.num_instruction_dialogues = 512
    config.synthetic.instruction_max_turns = 3
    config.synthetic.instruction_turn_probability = 0.5
    # Multi-turn dialogues whose user messages Ghost Attention answers anew, per version.
    config.synthetic.num_gatt_dialogues = 32
    config.synthetic.gatt_min_turns = 2
    config.synthetic.gatt_max_turns = 3

    # Prompts per version for the comparisons, for rejection sampling (also PPO's training
    # prompts) and for PPO's early stopping, and the held-out evaluation prompts, which are the
    # same for every version. With a file annotator the prompts are the comparisons' contexts.
    config.prompts = ml_collections.ConfigDict()
    config.prompts.comparisons = 512
    config.prompts.rejection_sampling = 256
    config.prompts.ppo_eval = 32
    config.prompts.eval = 128
    # Prompts with more tokens are dropped (and counted in the log).
    config.prompts.max_prompt_length = 96

    # Who labels the comparisons; fields of `annotators.default_annotator_config`. The
    # simulated annotator judges the loop's synthetic world, so it refers to its settings.
    config.annotator = annotators.default_annotator_config("simulated")
    config.annotator.world_seed = config.synthetic.get_ref("world_seed")
    config.annotator.num_animals = config.synthetic.get_ref("num_animals")

    # Collection of comparisons with the simulated annotator.
    config.comparisons = ml_collections.ConfigDict()
    # The two answers of a pair are sampled from the latest policy at these temperatures.
    config.comparisons.temperatures = (1.0, 0.7)
    config.comparisons.max_new_tokens = 48
    # Prompts per sampler call, and per resumable batch file.
    config.comparisons.batch_size = 128
    # Share of each version's new comparisons held out to evaluate its reward models.
    config.comparisons.eval_fraction = 0.1
    # With a file annotator: use only the first this many comparisons of each version's
    # share of the pool (0: all).
    config.comparisons.max_per_version = 0

    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.temperature = 1.0
    config.evaluation.max_new_tokens = 48
    config.evaluation.batch_size = 128
    config.evaluation.seed = 0
    # Score gaps at most this large count as ties in the win rates.
    config.evaluation.reward_model_tie_margin = 0.0
    config.evaluation.gold_tie_margin = 0.0

    # Mesh of the loop's own sampling and scoring: sizes of the (data, fsdp, tensor) axes over
    # the first `num_devices` devices (0: all).
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.num_devices = 0
    return config


def _stage_configs(config: ml_collections.ConfigDict) -> None:
    """Attaches the stage configs: the tiny variants of the stage modules, unlocked."""
    config.sft = _unlocked(sft_configs.get_config("tiny"))
    config.reward_model = _unlocked(rm_configs.get_config("tiny"))
    config.rejection_sampling = _unlocked(rs_configs.get_config("tiny"))
    config.ppo = _unlocked(ppo_configs.get_config("tiny"))
    config.ghost_attention = _unlocked(gatt_configs.get_config("tiny"))
    # The loop passes every input of a stage itself; the stages' own synthetic set-ups and
    # data paths stay unused.
    for name in ("rejection_sampling", "ppo", "ghost_attention"):
        config[name].synthetic.enabled = False
    config.reward_model.data.hh_rlhf_path = ""
    config.reward_model.data.limit = 0
    if "base_policy" in config.ghost_attention:
        del config.ghost_attention["base_policy"]


def _tiny(config: ml_collections.ConfigDict) -> None:
    config.synthetic.enabled = True
    # Four animals: few enough facts that the 2-layer policy and reward models learn them
    # from a few hundred demonstrations and comparisons.
    config.synthetic.num_animals = 4
    config.prompts.eval = 256
    config.num_devices = 1
    config.mesh = ml_collections.ConfigDict(_SINGLE_DEVICE)
    vocab_size = config.synthetic.vocab_size
    model = {"dtype": "float32", "vocab_size": vocab_size, "max_seq_len": 512}

    sft = config.sft
    _one_device(sft)
    sft.init_from = "random:tiny"
    sft.model_overrides = ml_collections.ConfigDict(model)
    sft.data.hh_rlhf_path = ""
    sft.data.eval_fraction = 0.0
    sft.data.max_length = 128
    sft.batch_size = 32
    sft.num_steps = 400
    sft.optimizer.learning_rate = 3e-3
    sft.loop.log_every = 50
    sft.loop.eval_every = 0
    sft.loop.checkpoint_every = 100

    reward_model = config.reward_model
    reward_model.model_overrides = ml_collections.ConfigDict()
    reward_model.data.tokenizer = ""
    reward_model.data.max_length = 128
    reward_model.batch_size = 16
    reward_model.eval_batch_size = 64
    reward_model.num_epochs = 2
    reward_model.optimizer.learning_rate = 1e-3
    reward_model.loop.log_every = 25
    reward_model.loop.eval_every = 0
    reward_model.loop.checkpoint_every = 100
    reward_model.mesh = ml_collections.ConfigDict(_SINGLE_DEVICE)

    rs = config.rejection_sampling
    _one_device(rs)
    rs.sampling.num_samples = 8
    rs.sampling.temperature = 1.0
    rs.sampling.max_prompt_length = 96
    rs.sampling.max_new_tokens = 48
    rs.sampling.prompt_batch_size = 64
    rs.sampling.score_batch_size = 128
    rs.sampling.save_all_responses = False
    finetune = rs.finetune
    _one_device(finetune)
    finetune.model_overrides = ml_collections.ConfigDict()
    finetune.data.hh_rlhf_path = ""
    finetune.data.eval_fraction = 0.0
    finetune.data.max_length = 128
    finetune.batch_size = 32
    finetune.num_epochs = 2
    # A tenth of the SFT peak: a larger step on a few hundred selected answers makes the
    # policy forget facts that the selection cannot check.
    finetune.optimizer.learning_rate = 3e-4
    finetune.loop.log_every = 8
    finetune.loop.eval_every = 0
    finetune.loop.checkpoint_every = 32

    ppo = config.ppo
    _one_device(ppo)
    ppo.rollout.batch_size = 64
    ppo.rollout.sampling_batch_size = 64
    ppo.rollout.max_prompt_length = 96
    ppo.rollout.max_response_length = 48
    ppo.ppo.minibatch_size = 16
    ppo.prompts.num_eval = 32
    ppo.num_iterations = 8
    ppo.eval_every = 4
    ppo.checkpoint_every = 4
    # The reward models judge style well and facts poorly, so PPO stays close to its start.
    ppo.optimizer.learning_rate = 1e-4
    ppo.reward.beta = 0.1

    gatt = config.ghost_attention
    _one_device(gatt)
    gatt.sampling.batch_size = 32
    gatt.sampling.max_new_tokens = 48
    gatt.sampling.max_prompt_length = 256
    gatt.finetune.data.max_length = 256
    # A few dozen kept turns per version: small batches give the warm-up and decay room.
    gatt.finetune.batch_size = 4
    gatt.finetune.num_epochs = 2
    gatt.finetune.optimizer.learning_rate = 3e-4
    gatt.finetune.loop.log_every = 8
    gatt.finetune.loop.checkpoint_every = 32


def _hh_rlhf(config: ml_collections.ConfigDict) -> None:
    shared = shared_dir()
    hh_path = str(shared / "data" / "hh-rlhf" / "harmless-base-2000.jsonl.gz")
    config.tokenizer = str(shared / "models" / "llama2-tokenizer" / "tokenizer.model")
    config.num_versions = 2
    config.ppo_from_version = 2
    # Ghost Attention keeps only answers that follow a checkable instruction, which a small
    # randomly initialised model trained on these transcripts does not produce.
    config.ghost_attention_from_version = 0
    config.num_devices = 1
    config.mesh = ml_collections.ConfigDict(_SINGLE_DEVICE)
    config.prompts.max_prompt_length = 192
    config.prompts.eval = 64
    config.prompts.ppo_eval = 32

    config.annotator = annotators.default_annotator_config("file")
    config.annotator.format = "hh_rlhf"
    config.annotator.path = hh_path
    config.annotator.subset = "harmless-base"
    # A few of the real HH-RLHF transcripts break the dialogue format.
    config.annotator.skip_invalid = True
    config.comparisons.eval_fraction = 0.1

    model = {"dtype": "float32", "hidden_size": 64, "intermediate_size": 176, "num_layers": 2,
             "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 512}
    sft = config.sft
    _one_device(sft)
    sft.init_from = "random:tiny"
    sft.model_overrides = ml_collections.ConfigDict(model)
    sft.data.tokenizer = config.tokenizer
    sft.data.hh_rlhf_path = hh_path
    sft.data.eval_fraction = 0.0
    sft.data.max_length = 256
    sft.num_epochs = 1

    reward_model = config.reward_model
    reward_model.model_overrides = ml_collections.ConfigDict()
    reward_model.data.tokenizer = config.tokenizer
    reward_model.data.max_length = 256
    # Every harmless-base prompt is a safety prompt, so Llama 2's mixtures would leave the
    # helpfulness model no data of its own kind: both models train on every comparison.
    reward_model.data.mix = False
    reward_model.batch_size = 32
    reward_model.num_epochs = 2
    reward_model.mesh = ml_collections.ConfigDict(_SINGLE_DEVICE)

    rs = config.rejection_sampling
    _one_device(rs)
    rs.sampling.num_samples = 4
    rs.sampling.max_prompt_length = 192
    rs.sampling.max_new_tokens = 32
    rs.sampling.prompt_batch_size = 32
    rs.sampling.save_all_responses = False
    # A small model trained on a few hundred transcripts rarely ends an answer with EOS.
    rs.selection.skip_unfinished = False
    finetune = rs.finetune
    _one_device(finetune)
    finetune.data.hh_rlhf_path = ""
    finetune.data.eval_fraction = 0.0
    finetune.data.max_length = 256
    finetune.batch_size = 16
    finetune.num_epochs = 1

    ppo = config.ppo
    _one_device(ppo)
    ppo.rollout.batch_size = 32
    ppo.rollout.sampling_batch_size = 32
    ppo.rollout.max_prompt_length = 192
    ppo.rollout.max_response_length = 32
    ppo.ppo.minibatch_size = 8
    ppo.prompts.num_eval = 32
    ppo.num_iterations = 4
    ppo.eval_every = 2
    ppo.checkpoint_every = 2

    _one_device(config.ghost_attention)
    config.comparisons.max_new_tokens = 32
    config.evaluation.max_new_tokens = 32
    config.evaluation.batch_size = 32


def _smoke(config: ml_collections.ConfigDict) -> None:
    """Shrinks a variant to a few prompts and steps.

    Compilation dominates such a run, so stages get equal shapes wherever that costs
    nothing. The loop's samplers and PPO's draw batches of 8 prompts at temperature 1, which
    compile one sampler. The SFT, rejection-sampling and Ghost Attention fine-tuning share
    batch size, length, step count and learning rate, which compile one train step.
    """
    config.num_versions = min(config.num_versions, 2)
    if config.ppo_from_version:
        config.ppo_from_version = min(config.ppo_from_version, config.num_versions)
    if config.ghost_attention_from_version:
        config.ghost_attention_from_version = min(config.ghost_attention_from_version,
                                                  config.num_versions)
    batch, new_tokens, prompt_length = 8, 8, 64
    config.synthetic.num_sft_dialogues = 64
    config.synthetic.num_instruction_dialogues = 8
    config.synthetic.num_gatt_dialogues = 4
    config.synthetic.gatt_max_turns = 2
    config.prompts.comparisons = 32
    config.prompts.rejection_sampling = batch
    config.prompts.ppo_eval = batch
    config.prompts.eval = batch
    if config.synthetic.enabled:
        config.prompts.max_prompt_length = prompt_length
    config.comparisons.temperatures = (1.0, 1.0)
    config.comparisons.max_new_tokens = new_tokens
    config.comparisons.batch_size = batch
    config.comparisons.eval_fraction = 0.25
    config.comparisons.max_per_version = 48
    config.evaluation.temperature = 1.0
    config.evaluation.max_new_tokens = new_tokens
    config.evaluation.batch_size = batch

    config.sft.data.limit = 64
    finetunes = (config.sft, config.rejection_sampling.finetune, config.ghost_attention.finetune)
    for finetune in finetunes:
        finetune.data.max_length = 128
        finetune.batch_size = 2
        finetune.num_epochs = 1
        finetune.num_steps = 2
        finetune.optimizer.learning_rate = 1e-3
        finetune.loop.log_every = 1
        finetune.loop.checkpoint_every = 2

    config.reward_model.batch_size = 4
    config.reward_model.eval_batch_size = 8
    config.reward_model.num_epochs = 1
    config.reward_model.loop.log_every = 2
    config.reward_model.loop.checkpoint_every = 4

    rs = config.rejection_sampling
    rs.sampling.num_samples = 2
    rs.sampling.max_new_tokens = new_tokens
    rs.sampling.prompt_batch_size = batch
    # Answers of a model trained for a few steps rarely end with EOS.
    rs.selection.skip_unfinished = False

    ppo = config.ppo
    ppo.rollout.batch_size = batch
    ppo.rollout.sampling_batch_size = batch
    ppo.rollout.max_response_length = new_tokens
    ppo.rollout.temperature = 1.0
    if config.synthetic.enabled:
        ppo.rollout.max_prompt_length = prompt_length
        rs.sampling.max_prompt_length = prompt_length
    ppo.ppo.minibatch_size = 4
    ppo.prompts.num_eval = batch
    ppo.num_iterations = 1
    ppo.eval_every = 1
    ppo.checkpoint_every = 1

    gatt = config.ghost_attention
    gatt.sampling.num_samples = 2
    gatt.sampling.max_new_tokens = new_tokens
    gatt.sampling.batch_size = 4
    gatt.data.max_dialogues = 4
    # Answers of a model trained for a few steps rarely follow an instruction or end with
    # EOS, so every sample is kept.
    gatt.rejection.use_checker = False
    gatt.rejection.require_eos = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config of a variant.

    Args:
      arg: "<variant>" or "<variant>,smoke", with the variant one of `VARIANTS`; "tiny" when
        None.
    """
    parts = [part.strip() for part in (arg or "tiny").split(",") if part.strip()]
    variant, options = parts[0], parts[1:]
    if variant not in VARIANTS:
        raise ValueError(f"Unknown RLHF loop variant {variant!r}; expected one of {VARIANTS}.")
    unknown = sorted(set(options) - {"smoke"})
    if unknown:
        raise ValueError(f"Unknown RLHF loop config options {unknown}; the only option is "
                         "'smoke'.")

    config = _base_config()
    config.variant = variant
    _stage_configs(config)
    if variant == "tiny":
        _tiny(config)
    else:
        _hh_rlhf(config)
    if "smoke" in options:
        _smoke(config)
    config.lock()
    return config
