"""Tests of the reward model stage: scoring, loss, mixing, evaluation, training and export.

Expected values come from hand computation (stated in a comment), from running the plain model
on unpadded sequences, or from a single-device run of the same step.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from llama_rlhf import baselines, losses, sharding
from llama_rlhf.data.chat import Message, encode_for_training, encode_prompt
from llama_rlhf.data.preferences import Comparison, PreferenceLevel, write_comparisons_jsonl
from llama_rlhf.data.tokenizer import train_sentencepiece
from llama_rlhf.model import Llama, LlamaConfig, init_params
from llama_rlhf.reward_model import evaluation, mixing, scoring, trainer
from llama_rlhf.training import checkpoints
from llama_rlhf.training.loop import shard_batch
from llama_rlhf.training.optim import default_optimizer_config, make_optimizer
from llama_rlhf.training.state import create_train_state

# Small enough to run in milliseconds; the widths divide a (data 2, fsdp 2, tensor 2) mesh.
TINY = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_seq_len=64)
EOS = 2


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0), head="scalar")


@jax.jit
def _all_positions(params, tokens):
    return Llama(TINY, head="scalar").apply({"params": params}, tokens)[0]


def per_position_scores(params, tokens):
    """The scalar head at every position of unpadded sequences [B, T]."""
    return np.asarray(_all_positions(params, jnp.asarray(tokens)))


# ---------------------------------------------------------------------------------------------
# Ranking loss.


def test_pair_loss_hand_values():
    scores = jnp.array([[1.0, 0.0]])
    # Margin table "small" gives level 0 (significantly better) m = 1: -log σ(1 - 0 - 1) = log 2.
    loss, _ = trainer.pair_loss(scores, jnp.array([losses.SIGNIFICANTLY_BETTER]), "small")
    assert_allclose(loss, math.log(2.0), atol=1e-6)
    assert round(float(loss), 4) == 0.6931
    # No margin: -log σ(1) = log(1 + e^-1) = 0.31326.
    loss, _ = trainer.pair_loss(scores, jnp.array([losses.SIGNIFICANTLY_BETTER]), "none")
    assert round(float(loss), 4) == 0.3133


def test_pair_loss_grows_with_margin():
    scores = jnp.array([[1.0, 0.0]])
    level = jnp.array([losses.SIGNIFICANTLY_BETTER])
    by_table = {table: float(trainer.pair_loss(scores, level, table)[0])
                for table in ("none", "small", "large")}
    # Margins 0 < 1 < 3 for a significantly better answer.
    assert by_table["none"] < by_table["small"] < by_table["large"]
    # Large margin m = 3: log(1 + e^2) = 2.12693.
    assert_allclose(by_table["large"], math.log1p(math.exp(2.0)), atol=1e-6)


def test_pair_loss_unknown_level_has_no_margin():
    scores = jnp.array([[1.0, 0.0]])
    loss_unknown, _ = trainer.pair_loss(scores, jnp.array([losses.UNKNOWN]), "large")
    loss_none, _ = trainer.pair_loss(scores, jnp.array([losses.UNKNOWN]), "none")
    assert_allclose(loss_unknown, loss_none, atol=1e-7)
    assert_allclose(loss_unknown, math.log1p(math.exp(-1.0)), atol=1e-6)


def test_pair_loss_metrics():
    # Pairs: correct by 2, tie (wrong), wrong by 1.
    scores = jnp.array([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss, metrics = trainer.pair_loss(scores, jnp.array([4, 4, 4]), "none")
    # Metrics are (sum over pairs, number of pairs).
    assert_allclose(metrics["accuracy"], (1.0, 3.0), atol=1e-6)
    assert_allclose(metrics["score_gap"], (2.0 + 0.0 - 1.0, 3.0), atol=1e-6)
    assert_allclose(metrics["chosen_score"], (3.0, 3.0), atol=1e-6)
    assert_allclose(metrics["rejected_score"], (2.0, 3.0), atol=1e-6)
    # -log σ(2) + -log σ(0) + -log σ(-1), summed.
    expected_sum = math.log1p(math.exp(-2.0)) + math.log(2.0) + math.log1p(math.exp(1.0))
    assert_allclose(metrics["loss"], (expected_sum, 3.0), atol=1e-6)
    assert_allclose(loss, expected_sum / 3.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Scoring at the last real token.


def test_score_right_padding_with_eos_pad(tiny_params):
    real = [1, 7, 2, 1, 8, 9, 2]
    tokens = np.array([real + [EOS, EOS]])
    mask = np.array([[True] * 7 + [False] * 2])
    got = scoring.score(TINY, tiny_params, tokens, mask)
    # The expected value is the head at index 6 of the unpadded sequence.
    expected = per_position_scores(tiny_params, [real])[0, 6]
    assert_allclose(got[0], expected, atol=1e-5)
    # Reading at the first EOS (index 2) or at the end of the row would give other values.
    padded = per_position_scores(tiny_params, tokens)[0]
    assert abs(padded[2] - expected) > 1e-4
    assert abs(padded[8] - expected) > 1e-4


def test_score_left_and_right_padding_agree(tiny_params):
    rows = [[1, 5, 9, 2], [1, 7, 2, 1, 8, 9, 2], [1, 3]]
    width = 9
    right = np.full((3, width), EOS)
    left = np.full((3, width), EOS)
    right_mask = np.zeros((3, width), bool)
    left_mask = np.zeros((3, width), bool)
    for i, row in enumerate(rows):
        right[i, :len(row)] = row
        right_mask[i, :len(row)] = True
        left[i, width - len(row):] = row
        left_mask[i, width - len(row):] = True
    expected = [per_position_scores(tiny_params, [row])[0, -1] for row in rows]
    assert_allclose(scoring.score(TINY, tiny_params, right, right_mask), expected, atol=1e-5)
    assert_allclose(scoring.score(TINY, tiny_params, left, left_mask), expected, atol=1e-5)


def test_score_pairs_shape_and_order(tiny_params):
    tokens = np.array([[[1, 5, 6, 2], [1, 5, 7, 2]]])
    mask = np.ones_like(tokens, bool)
    pair = scoring.score_pairs(TINY, tiny_params, tokens, mask)
    assert pair.shape == (1, 2)
    assert_allclose(pair[0], scoring.score(TINY, tiny_params, tokens[0], mask[0]), atol=1e-6)


def test_pad_sequences_truncates_from_start():
    tokens, mask, truncated = scoring.pad_sequences(
        [[1, 2, 3, 4, 5], [6, 7]], pad_id=0, max_length=4)
    assert truncated == 1
    assert tokens.tolist() == [[2, 3, 4, 5], [6, 7, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    tokens, mask, _ = scoring.pad_sequences(
        [[6, 7]], pad_id=0, max_length=8, padding_side="left", length_multiple=3)
    # Two tokens round up to a length of 3.
    assert tokens.tolist() == [[0, 6, 7]]
    assert mask.tolist() == [[False, True, True]]


def test_pad_sequences_rejects_bad_input():
    with pytest.raises(ValueError, match="Sequence 1 is empty"):
        scoring.pad_sequences([[1], []], pad_id=0, max_length=4)
    with pytest.raises(ValueError, match="padding_side"):
        scoring.pad_sequences([[1]], pad_id=0, max_length=4, padding_side="middle")


def test_reward_model_scores_padded_batches(tiny_params):
    model = scoring.RewardModel(TINY, tiny_params, {"score_mean": 1.0, "score_std": 2.0},
                                pad_id=EOS)
    rows = [[1, 5, 9, 2], [1, 7, 2, 1, 8, 9, 2], [1, 3]]
    expected = [per_position_scores(tiny_params, [row])[0, -1] for row in rows]
    # Three rows are filled up to a batch of 8 inside; the filler scores are dropped.
    tokens, mask, _ = scoring.pad_sequences(rows, pad_id=EOS, max_length=16,
                                            padding_side="left")
    assert_allclose(model.score_tokens(tokens, mask), expected, atol=1e-5)
    prompts = [row[:2] for row in rows]
    answers = [row[2:] for row in rows]
    assert_allclose(model.score_responses(prompts, answers, batch_size=2), expected, atol=1e-5)
    assert_allclose(model.whiten(np.array([3.0, -1.0])), [1.0, -1.0])


def test_reward_model_rejects_bad_input(tiny_params, synthetic_setup):
    model = scoring.RewardModel(TINY, tiny_params)
    with pytest.raises(ValueError, match="same shape"):
        model.score_tokens(np.ones((2, 4), np.int32), np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="as many prompts as responses"):
        model.score_responses([[1]], [[2], [3]])
    with pytest.raises(KeyError, match="score_mean"):
        _ = model.score_mean
    _, _, lm_dir = synthetic_setup
    with pytest.raises(ValueError, match="expected head 'scalar'"):
        scoring.RewardModel.load(lm_dir)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def test_evaluate_scores_hand_made():
    chosen = np.array([2.0, 0.5, 1.0, 0.0, 3.0, 1.0])
    rejected = np.array([1.0, 1.0, 1.0, 0.5, 0.0, 2.0])
    levels = np.array([0, 0, 1, 1, 4, 4])
    result = evaluation.evaluate_scores(chosen, rejected, levels)
    # Correct pairs: 0 (2 > 1) and 4 (3 > 0); pair 2 is a tie and counts as wrong.
    assert result["pairs"] == 6
    assert result["ties"] == 1
    assert_allclose(result["accuracy"], 2 / 6)
    assert result["per_level"]["significantly_better"] == {"pairs": 2, "correct": 1,
                                                           "accuracy": 0.5}
    assert result["per_level"]["better"] == {"pairs": 2, "correct": 0, "accuracy": 0.0}
    assert result["per_level"]["slightly_better"] == {"pairs": 0, "correct": 0,
                                                      "accuracy": None}
    assert result["per_level"]["unknown"]["accuracy"] == 0.5
    # Gaps 1, -0.5, 0, -0.5, 3, -1 sum to 2.
    assert_allclose(result["mean_score_gap"], 2 / 6)
    both = np.concatenate([chosen, rejected])
    assert_allclose(result["score_mean"], both.mean())
    assert_allclose(result["score_std"], both.std())


def test_evaluate_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        evaluation.evaluate_scores([1.0], [1.0, 2.0], [0])
    with pytest.raises(ValueError, match="NaN"):
        evaluation.evaluate_scores([float("nan")], [1.0], [0])
    with pytest.raises(ValueError, match="levels \\[7\\]"):
        evaluation.evaluate_scores([1.0], [0.0], [7])


def test_accuracy_table_layout():
    result = evaluation.evaluate_scores([2.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0, 0, 3])
    table = evaluation.accuracy_table_markdown({"Safety RM": result})
    lines = table.strip().split("\n")
    assert lines[0] == ("| | Significantly Better | Better | Slightly Better | Negligibly Better "
                        "| Unknown | Overall |")
    assert lines[2] == "| Safety RM: accuracy (%) | 50.0 | – | – | 100.0 | – | 66.7 |"
    assert lines[3] == "| Safety RM: pairs | 2 | 0 | 0 | 1 | 0 | 3 |"


def test_write_evaluation_files(tmp_path):
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 50)
    metrics = evaluation.write_evaluation(tmp_path, chosen, rejected, np.full(50, 4))
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics
    assert (tmp_path / "accuracy_table.md").read_text().startswith("| |")
    assert (tmp_path / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    histogram = json.loads((tmp_path / "score_histogram.json").read_text())
    assert sum(histogram["chosen_counts"]) == 50
    assert sum(histogram["rejected_counts"]) == 50
    stored = np.load(tmp_path / "scores.npz")
    assert_allclose(stored["chosen"], chosen.astype(np.float32))
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Train step on a mesh.


def fake_comparison_batch(num_pairs, length, seed):
    """Random comparison batch with right-padded rows of random lengths and random levels."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, TINY.vocab_size, (num_pairs, 2, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, (num_pairs, 2))
    mask = np.arange(length)[None, None, :] < lengths[..., None]
    tokens = np.where(mask, tokens, EOS).astype(np.int32)
    return {"tokens": tokens, "mask": mask,
            "level": rng.integers(0, 5, num_pairs).astype(np.int32)}


def run_train_step(mesh, params, batch):
    tx, schedule = make_optimizer(default_optimizer_config(learning_rate=1e-2, min_warmup_steps=0,
                                                           warmup_fraction=0.0), total_steps=10)
    state, state_shardings = create_train_state(TINY, "scalar", tx, mesh, jax.random.key(1),
                                                params=params)
    step = trainer.build_train_step(TINY, "small", mesh=mesh, state_shardings=state_shardings,
                                    batch_size=batch["tokens"].shape[0], schedule=schedule)
    new_state, metrics = step(state, shard_batch(mesh, batch), jax.random.key(2))
    return jax.device_get(new_state.params), jax.device_get(metrics)


def test_train_step_mesh_matches_single_device(tiny_params):
    assert len(jax.devices()) == 8, "conftest.py should provide 8 fake CPU devices"
    batch = fake_comparison_batch(num_pairs=8, length=12, seed=0)
    params = jax.device_get(tiny_params)
    single = sharding.create_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params_one, metrics_one = run_train_step(single, params, batch)
    params_mesh, metrics_mesh = run_train_step(mesh, params, batch)

    loss_one = metrics_one["loss"][0] / metrics_one["loss"][1]
    loss_mesh = metrics_mesh["loss"][0] / metrics_mesh["loss"][1]
    assert_allclose(loss_mesh, loss_one, atol=1e-5)
    # The loss is the mean over the batch of the ranking loss of the single-device scores.
    scores = np.asarray(scoring.score_pairs(TINY, params, batch["tokens"], batch["mask"]))
    margins = np.array(losses.MARGIN_TABLES["small"] + (0.0,))[batch["level"]]
    expected = np.mean(np.log1p(np.exp(-(scores[:, 0] - scores[:, 1] - margins))))
    assert_allclose(loss_one, expected, atol=1e-5)
    jax.tree.map(lambda a, b: assert_allclose(a, b, atol=1e-5), params_mesh, params_one)
    # The step moved the parameters, so the comparison above compares updated values.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_one, params)
    assert max(jax.tree.leaves(moved)) > 1e-4


# ---------------------------------------------------------------------------------------------
# Training mixtures and the held-out split.


def make_comparisons(num_helpfulness, num_safety):
    """Distinct comparisons; the rejected answer carries the index so each one is unique."""
    return [
        Comparison(context=(Message("user", f"question {i}"),), chosen="a fine answer",
                   rejected=f"answer {i}", is_safety_prompt=i >= num_helpfulness)
        for i in range(num_helpfulness + num_safety)
    ]


def test_mix_helpfulness_counts():
    data = make_comparisons(num_helpfulness=30, num_safety=50)
    mixture = mixing.mix_for_kind(data, "helpfulness", seed=0)
    # All 30 helpfulness pairs plus an equal number of the 50 safety pairs.
    assert len(mixture) == 60
    assert sum(not c.is_safety_prompt for c in mixture) == 30
    assert len(set(mixture)) == 60
    # With fewer safety pairs than helpfulness pairs, all of them are used.
    few = mixing.mix_for_kind(make_comparisons(30, 10), "helpfulness", seed=0)
    assert sum(c.is_safety_prompt for c in few) == 10
    assert len(few) == 40


def test_mix_safety_counts():
    data = make_comparisons(num_helpfulness=40, num_safety=90)
    mixture = mixing.mix_for_kind(data, "safety", seed=0)
    # 90 safety pairs are 90% of the mixture, so 90 / 9 = 10 helpfulness pairs join them.
    assert sum(c.is_safety_prompt for c in mixture) == 90
    assert sum(not c.is_safety_prompt for c in mixture) == 10
    assert len(set(mixture)) == 100
    # An 80/20 mixture of 90 safety pairs takes 90 * 0.2 / 0.8 = 22.5, rounded to 22 (even).
    mixture = mixing.mix_for_kind(data, "safety", seed=0, safety_fraction=0.8)
    assert sum(not c.is_safety_prompt for c in mixture) == 22


def test_mix_is_deterministic_per_seed():
    data = make_comparisons(num_helpfulness=30, num_safety=50)
    first = mixing.mix_for_kind(data, "helpfulness", seed=3)
    assert first == mixing.mix_for_kind(data, "helpfulness", seed=3)
    assert first != mixing.mix_for_kind(data, "helpfulness", seed=4)
    # The order is shuffled, not all helpfulness pairs first.
    assert [c.is_safety_prompt for c in first] != sorted(c.is_safety_prompt for c in first)


def test_mix_rejects_bad_input():
    with pytest.raises(ValueError, match="No safety comparisons"):
        mixing.mix_for_kind(make_comparisons(5, 0), "safety", seed=0)
    with pytest.raises(ValueError, match="Unknown reward model kind"):
        mixing.mix_for_kind(make_comparisons(5, 5), "harmlessness", seed=0)
    with pytest.raises(ValueError, match="safety_fraction"):
        mixing.mix_for_kind(make_comparisons(5, 5), "safety", seed=0, safety_fraction=0.0)


def test_split_held_out():
    data = make_comparisons(num_helpfulness=100, num_safety=0)
    train, held_out = mixing.split_held_out(data, 0.1, seed=0)
    assert len(held_out) == 10
    assert len(train) == 90
    assert set(train).isdisjoint(held_out)
    assert (train, held_out) == mixing.split_held_out(data, 0.1, seed=0)
    assert held_out != mixing.split_held_out(data, 0.1, seed=1)[1]
    with pytest.raises(ValueError, match="eval_fraction"):
        mixing.split_held_out(data, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# Baselines.


def test_length_baselines_count_ties_as_wrong():
    chosen_lengths, rejected_lengths = [5, 2, 4, 7], [3, 6, 4, 1]
    longer = evaluation.evaluate_scores(baselines.length_scores(chosen_lengths, "longer"),
                                        baselines.length_scores(rejected_lengths, "longer"),
                                        [4] * 4)
    shorter = evaluation.evaluate_scores(baselines.length_scores(chosen_lengths, "shorter"),
                                         baselines.length_scores(rejected_lengths, "shorter"),
                                         [4] * 4)
    # Pairs 0 and 3 have the longer answer chosen, pair 1 the shorter, pair 2 is a tie.
    assert longer["accuracy"] == 0.5
    assert shorter["accuracy"] == 0.25
    assert longer["ties"] == shorter["ties"] == 1
    with pytest.raises(ValueError, match="length preference"):
        baselines.length_scores([1], "random")


def polite_and_rude_pairs(num, seed):
    """Pairs whose chosen answer is polite and whose rejected answer is rude, in random words."""
    rng = np.random.default_rng(seed)
    filler = ["the", "weather", "today", "is", "a", "question", "about", "cats", "and", "dogs"]
    polite = ["thanks", "gladly", "certainly", "please"]
    rude = ["idiot", "whatever", "shut", "stupid"]
    chosen, rejected = [], []
    for _ in range(num):
        words = list(rng.choice(filler, 5))
        chosen.append(" ".join(words + [str(rng.choice(polite))]))
        rejected.append(" ".join(list(rng.choice(filler, 5)) + [str(rng.choice(rude))]))
    return chosen, rejected


def test_tfidf_baseline_learns_word_preferences():
    chosen, rejected = polite_and_rude_pairs(60, seed=0)
    model = baselines.TfidfPreferenceModel().fit(chosen, rejected)
    test_chosen, test_rejected = polite_and_rude_pairs(30, seed=1)
    result = evaluation.evaluate_scores(model.score(test_chosen), model.score(test_rejected),
                                        [4] * 30)
    assert result["accuracy"] == 1.0
    # The score is antisymmetric: swapping the answers flips the sign of the difference.
    assert model.score(["thanks"])[0] > 0 > model.score(["idiot"])[0]
    assert model.regularization in model.c_grid


def test_tfidf_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        baselines.TfidfPreferenceModel().fit(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least 5 training pairs"):
        baselines.TfidfPreferenceModel().fit(["a", "b"], ["c", "d"])
    with pytest.raises(RuntimeError, match="fit must run"):
        baselines.TfidfPreferenceModel().score(["a"])


# ---------------------------------------------------------------------------------------------
# Training, export and loading on synthetic comparisons.


def synthetic_comparisons(num, seed):
    """Comparisons of a polite (chosen) and a rude (rejected) answer, with random levels."""
    chosen, rejected = polite_and_rude_pairs(num, seed)
    rng = np.random.default_rng(seed)
    questions = ["what is the weather", "tell me about cats", "how are dogs"]
    return [
        Comparison(context=(Message("user", str(rng.choice(questions))),), chosen=c, rejected=r,
                   level=PreferenceLevel(int(rng.integers(0, 5))),
                   is_safety_prompt=bool(rng.integers(0, 2)))
        for c, r in zip(chosen, rejected, strict=True)
    ]


@pytest.fixture(scope="module")
def synthetic_setup(tmp_path_factory):
    """A SentencePiece tokenizer trained on the synthetic texts and an exported tiny LM."""
    folder = tmp_path_factory.mktemp("reward_model_setup")
    texts = []
    for comparison in synthetic_comparisons(200, seed=0):
        texts += [comparison.context[0].content, comparison.chosen, comparison.rejected]
    tokenizer = train_sentencepiece(texts, folder / "tokenizer", vocab_size=64,
                                    byte_fallback=False)
    # An exported language model serves as the SFT checkpoint that a reward model starts from.
    lm_config = TINY.replace(vocab_size=tokenizer.vocab_size)
    lm_dir = checkpoints.save_model(folder / "sft_model", lm_config,
                                    init_params(lm_config, jax.random.key(5), head="lm"),
                                    head="lm", metadata={})
    return folder, tokenizer, lm_dir


def reward_config(tokenizer_path, **fields):
    from configs import reward_model as reward_model_config

    config = reward_model_config.get_config("tiny,smoke")
    with config.unlocked():
        config.data.tokenizer = str(tokenizer_path)
        config.data.hh_rlhf_path = ""
        config.data.limit = 0
        config.kind = "helpfulness"
        config.batch_size = 8
        config.eval_batch_size = 8
        config.optimizer.learning_rate = 1e-2
        for name, value in fields.items():
            target, key = config, name
            while "." in key:
                head, key = key.split(".", 1)
                target = target[head]
            target[key] = value
    return config


def test_train_and_evaluate_exports_and_reloads(synthetic_setup, tmp_path):
    folder, tokenizer, lm_dir = synthetic_setup
    data_path = tmp_path / "comparisons.jsonl"
    write_comparisons_jsonl(data_path, synthetic_comparisons(64, seed=2))
    config = reward_config(folder / "tokenizer.model", init_from=str(lm_dir), kind="safety",
                           margin_table="large", num_epochs=2, baselines=True,
                           **{"data.comparisons_path": str(data_path), "data.max_length": 32,
                              "data.eval_fraction": 0.25, "data.mix": False})
    workdir = tmp_path / "run"
    result = trainer.train_and_evaluate(config, workdir)

    # 64 pairs: 16 held out, 48 for training in batches of 8, two epochs.
    assert result["steps"] == 12
    assert result["train_pairs"] == 48
    assert result["eval_pairs"] == 16
    # Polite against rude words separate easily: held-out accuracy well above chance.
    assert result["eval"]["accuracy"] >= 0.8
    assert (workdir / "config.json").is_file()
    for name in ("eval.json", "accuracy_table.md", "score_histogram.png", "scores.npz"):
        assert (workdir / "eval" / name).is_file(), name
    table = (workdir / "comparison.md").read_text()
    assert "longer answer wins" in table
    assert "TF-IDF" in table

    model = scoring.RewardModel.load(workdir / "model")
    assert model.kind == "safety"
    assert model.metadata["margin_table"] == "large"
    assert model.metadata["eval"] == result["eval"]
    assert model.pad_id == tokenizer.pad_id
    assert model.max_length == 32
    stored = np.load(workdir / "eval" / "scores.npz")
    both = np.concatenate([stored["chosen"], stored["rejected"]])
    assert_allclose(model.score_mean, both.mean(), rtol=1e-5)
    assert_allclose(model.score_std, both.std(), rtol=1e-5)

    # Scoring the held-out pairs again, from prompt and answer ids, reproduces the stored scores.
    _, held_out = mixing.split_held_out(synthetic_comparisons(64, seed=2), 0.25, seed=0)
    prompts, answers = [], []
    for comparison in held_out:
        prompt = encode_prompt(tokenizer, comparison.context)
        full, _ = encode_for_training(
            tokenizer, [*comparison.context, Message("assistant", comparison.chosen)])
        assert full[:len(prompt)] == prompt
        prompts.append(prompt)
        answers.append(full[len(prompt):])
    assert_allclose(model.score_responses(prompts, answers), stored["chosen"], atol=1e-4)
    whitened = model.whiten(stored["chosen"])
    assert_allclose(whitened, (stored["chosen"] - model.score_mean) / model.score_std, rtol=1e-5)


def test_train_on_comparisons_rejects_bad_config(synthetic_setup, tmp_path):
    folder, tokenizer, lm_dir = synthetic_setup
    pairs = synthetic_comparisons(16, seed=5)
    with pytest.raises(ValueError, match="config.kind"):
        trainer.train_on_comparisons(reward_config(folder / "tokenizer.model", kind="both"),
                                     tmp_path, pairs, pairs, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="config.margin_table"):
        trainer.train_on_comparisons(
            reward_config(folder / "tokenizer.model", margin_table="medium"), tmp_path, pairs,
            pairs, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="at least one held-out comparison"):
        trainer.train_on_comparisons(reward_config(folder / "tokenizer.model"), tmp_path,
                                     pairs, [], tokenizer=tokenizer, init_from=str(lm_dir))
    with pytest.raises(ValueError, match="config.init_from is empty"):
        trainer.train_on_comparisons(reward_config(folder / "tokenizer.model", init_from=""),
                                     tmp_path, pairs, pairs, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="No training data"):
        trainer.load_comparisons(reward_config(folder / "tokenizer.model").data)


# ---------------------------------------------------------------------------------------------
# Configs.


def test_config_variants_load():
    from configs import reward_model as reward_model_config

    for variant in reward_model_config.VARIANTS:
        config = reward_model_config.get_config(variant)
        assert config.variant == variant
        assert config.kind in mixing.KINDS
        assert config.margin_table in losses.MARGIN_TABLES
        smoke = reward_model_config.get_config(f"{variant},smoke")
        assert smoke.batch_size <= config.batch_size
    # Llama 2's reward model settings (Touvron et al. 2023, section 3.2.2).
    for variant, learning_rate in (("7b", 1e-5), ("13b", 1e-5), ("70b", 5e-6)):
        config = reward_model_config.get_config(variant)
        assert config.batch_size == 512
        assert config.num_epochs == 1
        assert config.optimizer.learning_rate == learning_rate
    with pytest.raises(ValueError, match="Unknown reward model variant"):
        reward_model_config.get_config("8b")
    with pytest.raises(ValueError, match="options"):
        reward_model_config.get_config("tiny,fast")
    with pytest.raises(AttributeError):
        reward_model_config.get_config("tiny").learning_rate = 1.0


@pytest.mark.slow
def test_tiny_smoke_on_shared_data(shared, tmp_path):
    from configs import reward_model as reward_model_config

    config = reward_model_config.get_config("tiny,smoke")
    result = trainer.train_and_evaluate(config, tmp_path)
    # 40 HH-RLHF pairs: 4 held out, 36 for training in batches of 8.
    assert result["eval_pairs"] == 4
    assert result["steps"] == 4
    assert (tmp_path / "model" / "model.json").is_file()
