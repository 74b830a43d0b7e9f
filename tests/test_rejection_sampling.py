"""Tests of llama_rlhf.rejection_sampling: selection, pooling, gating, curves, resume, a full run.

Expected values come from hand-made score tables (stated in comments), from brute force over
all subsets with itertools and numpy, or from the reward models scored directly. The run
tests use a tiny random policy and random reward models saved to a temporary folder, with the
tokenizer of the synthetic world.
"""

import itertools
import json
import math

import jax
import ml_collections
import numpy as np
import pytest
from numpy.testing import assert_allclose

from configs import rejection_sampling as rs_configs
from llama_rlhf import rejection_sampling as rs
from llama_rlhf import sft
from llama_rlhf.annotators import GoldScorer
from llama_rlhf.data import synthetic
from llama_rlhf.data.chat import Message
from llama_rlhf.data.preferences import InvalidRecordError
from llama_rlhf.model import get_variant, param_shapes
from llama_rlhf.ppo import Prompt, write_prompts_jsonl
from llama_rlhf.synthetic import SyntheticSetup
from llama_rlhf.training.checkpoints import load_model, save_model

# ---------------------------------------------------------------------------------------------
# Helpers.


def selection(user_text, answer, score, *, iteration=1, is_safety=False):
    return rs.Selection(
        messages=(Message("user", user_text), Message("assistant", answer)),
        is_safety_prompt=is_safety, score=score, iteration=iteration)


class FixedScores:
    """A stand-in reward model whose raw output for row i is scores[i]."""

    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float64)

    def score_responses(self, prompts, responses, *, batch_size):
        assert len(prompts) == len(responses) == len(self.scores)
        return self.scores


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Selection.


def test_select_best_takes_argmax_per_prompt():
    # Hand-made table: prompt 0's best is sample 1 (0.9), prompt 1's is sample 2 (0.7).
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]])
    assert rs.select_best(scores).tolist() == [1, 2]


def test_select_best_respects_eligibility():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7], [0.4, 0.6, 0.8]])
    eligible = np.array([[True, False, True], [False, False, False], [True, True, True]])
    # Prompt 0: 0.9 is not eligible, so 0.5 (sample 2); prompt 1: nothing eligible.
    assert rs.select_best(scores, eligible).tolist() == [2, -1, 2]


def test_select_best_breaks_ties_by_lowest_index():
    assert rs.select_best(np.array([[0.5, 0.7, 0.7]])).tolist() == [1]


def test_select_best_rejects_bad_shapes():
    with pytest.raises(ValueError, match="prompts, samples"):
        rs.select_best(np.zeros(3))
    with pytest.raises(ValueError, match="eligible has shape"):
        rs.select_best(np.zeros((2, 3)), np.ones((2, 2), bool))


# ---------------------------------------------------------------------------------------------
# Pooling.


def test_pool_keeps_best_per_prompt_across_iterations():
    # Prompt a: best in iteration 1 (0.8 > 0.6, 0.5); prompt b: best in iteration 3 (0.9);
    # prompt c: only in iteration 2.
    first = [selection("a?", "a1", 0.8, iteration=1), selection("b?", "b1", 0.2, iteration=1)]
    second = [selection("a?", "a2", 0.6, iteration=2), selection("c?", "c2", 0.4, iteration=2)]
    third = [selection("b?", "b3", 0.9, iteration=3), selection("a?", "a3", 0.5, iteration=3)]
    pooled = rs.pool_selections(first, second, third)
    answers = {s.prompt[0].content: s.answer for s in pooled}
    assert answers == {"a?": "a1", "b?": "b3", "c?": "c2"}
    # The newest group's prompts come first, in its order, then older prompts.
    assert [s.prompt[0].content for s in pooled] == ["b?", "a?", "c?"]


def test_pool_tie_keeps_the_newer_answer():
    pooled = rs.pool_selections([selection("a?", "old", 0.5)], [selection("a?", "new", 0.5)])
    assert [s.answer for s in pooled] == ["new"]


def test_pool_rejects_unscored_selection():
    with pytest.raises(ValueError, match="rescore it first"):
        rs.pool_selections([selection("a?", "x", math.nan)])


def test_prompt_key_depends_on_roles_and_text():
    user = (Message("user", "hi"),)
    assert rs.prompt_key(user) == rs.prompt_key((Message("user", "hi"),))
    assert rs.prompt_key(user) != rs.prompt_key((Message("user", "hi "),))
    system = (Message("system", "hi"), Message("user", "hi"))
    assert rs.prompt_key(system) != rs.prompt_key((Message("user", "hi"), Message("user", "hi")))


# ---------------------------------------------------------------------------------------------
# Selected-set files.


def test_selections_roundtrip_and_read_by_sft(tmp_path):
    path = tmp_path / "selected.jsonl"
    original = [
        rs.Selection(messages=(Message("system", "Be brief."), Message("user", "Hi?"),
                               Message("assistant", "Hello.")),
                     is_safety_prompt=False, score=0.7, helpfulness_score=1.2,
                     safety_score=None, used_safety=False, iteration=2,
                     reward_models={"helpfulness": "/rm/h", "safety": None},
                     sample_index=3, num_samples=8),
        selection("How do I hurt the cat?", "I can't help with that.", 0.9, is_safety=True),
    ]
    assert rs.write_selections_jsonl(path, original) == 2
    assert rs.read_selections_jsonl(path) == original
    record = json.loads(path.read_text().splitlines()[0])
    assert record["prompt_key"] == original[0].key
    # The SFT stage reads the same file as dialogues.
    dialogues = sft.read_dialogues_jsonl(path)
    assert dialogues[1][-1] == Message("assistant", "I can't help with that.")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "score": 0.5}, "is_safety_prompt"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "is_safety_prompt": False}, "'score' is missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "is_safety_prompt": False, "score": "high"}, "expected a number"),
    ({"messages": [{"role": "user", "content": "a"}], "is_safety_prompt": False,
      "score": 0.5}, "expected 'assistant'"),
])
def test_read_selections_names_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = selection("x?", "y", 0.1).to_json()
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InvalidRecordError, match=message) as error:
        rs.read_selections_jsonl(path)
    assert f"{path}:2" in str(error.value)


def test_read_selections_without_score_when_rescoring(tmp_path):
    path = tmp_path / "plain.jsonl"
    record = {"messages": [{"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}], "is_safety_prompt": True}
    path.write_text(json.dumps(record) + "\n")
    [read] = rs.read_selections_jsonl(path, require_score=False)
    assert math.isnan(read.score)
    assert read.is_safety_prompt


def test_read_selections_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rs.read_selections_jsonl(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# Gated scoring.


def test_gated_score_safety_threshold():
    # Raw outputs; σ(-1.6) = 0.168 >= 0.15 and σ(-1.8) = 0.142 < 0.15.
    helpfulness = [2.0, 2.0, 2.0, -0.5]
    safety = [-1.6, -1.8, 3.0, 1.0]
    is_safety = [False, False, True, False]
    scorer = rs.RewardScorer(FixedScores(helpfulness), FixedScores(safety), threshold=0.15)
    scored = scorer.score([[1]] * 4, [[2]] * 4, is_safety)
    # Row 0: harmless prompt, safety 0.168 above the threshold -> helpfulness σ(2).
    # Row 1: safety 0.142 below the threshold -> safety σ(-1.8).
    # Row 2: safety prompt -> safety σ(3) even though helpfulness is also high.
    # Row 3: harmless and safe -> helpfulness σ(-0.5).
    expected = [sigmoid(2.0), sigmoid(-1.8), sigmoid(3.0), sigmoid(-0.5)]
    assert_allclose(scored["score"], expected, rtol=1e-6)
    assert scored["used_safety"].tolist() == [False, True, True, False]
    assert_allclose(scored["helpfulness"], helpfulness)
    assert_allclose(scored["safety"], safety)


def test_score_without_safety_model_is_sigmoid_of_helpfulness():
    scorer = rs.RewardScorer(FixedScores([0.0, -3.0]), None)
    scored = scorer.score([[1], [1]], [[2], [2]], [True, False])
    assert_allclose(scored["score"], [0.5, sigmoid(-3.0)], rtol=1e-6)
    assert scored["used_safety"].tolist() == [False, False]
    assert np.isnan(scored["safety"]).all()


# ---------------------------------------------------------------------------------------------
# Best-of-N curves.


def brute_force_curves(scores):
    """Averages max and median over every N-subset of each prompt's samples."""
    num_prompts, k = scores.shape
    maxima, medians = [], []
    for n in range(1, k + 1):
        per_prompt_max, per_prompt_median = [], []
        for row in scores:
            subsets = list(itertools.combinations(row, n))
            per_prompt_max.append(np.mean([max(s) for s in subsets]))
            per_prompt_median.append(np.mean([np.median(s) for s in subsets]))
        maxima.append(np.mean(per_prompt_max))
        medians.append(np.mean(per_prompt_median))
    return maxima, medians


def test_best_of_n_curves_match_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(4, 6))
    scores[1, 2] = scores[1, 4]  # a tie
    curves = rs.best_of_n_curves(scores)
    maxima, medians = brute_force_curves(scores)
    assert curves["n"] == [1, 2, 3, 4, 5, 6]
    assert_allclose(curves["max"], maxima, rtol=1e-12)
    assert_allclose(curves["median"], medians, rtol=1e-12)


def test_plot_best_of_n_writes_png(tmp_path):
    curves = rs.best_of_n_curves(np.random.default_rng(1).uniform(size=(3, 4)))
    rs.plot_best_of_n(curves, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


# ---------------------------------------------------------------------------------------------
# Configs.


def test_config_variants():
    assert rs_configs.VARIANTS == ("tiny", "7b", "13b", "70b")
    for variant in ("7b", "13b", "70b"):
        config = rs_configs.get_config(variant)
        assert config.sampling.temperature == 1.2
        assert config.sampling.num_samples == 10
        assert config.selection.pool_previous and config.selection.rescore_previous
    assert rs_configs.get_config("70b").mesh.tensor == 8
    assert rs_configs.get_config("tiny").synthetic.enabled
    with pytest.raises(ValueError, match="Unknown rejection-sampling variant"):
        rs_configs.get_config("8b")
    with pytest.raises(ValueError, match="only option is 'smoke'"):
        rs_configs.get_config("tiny,fast")


def test_config_is_locked():
    config = rs_configs.get_config("7b")
    with pytest.raises(AttributeError):
        config.sampling.temperatur = 1.0
    with pytest.raises(AttributeError):
        config.finetune.bach_size = 2


# ---------------------------------------------------------------------------------------------
# Runs on tiny random models.


def random_params(config, head, seed, eos_id=None):
    """Random parameters; with `eos_id`, the EOS logit is raised so answers end early."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(shape.shape, np.float32)
        return (rng.standard_normal(shape.shape) * 0.05).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(config, head))
    if eos_id is not None:
        # A constant first embedding coordinate survives to the last RMSNorm, so lm_head[0,
        # EOS] raises the EOS logit at every position.
        params["embed"][:, 0] = 1.0
        params["lm_head"][0, :] = 0.0
        params["lm_head"][0, eos_id] = 0.8
    return params


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs_setup")
    world = synthetic.SyntheticWorld(seed=0, num_animals=4)
    tokenizer = synthetic.build_tokenizer(root, vocab_size=512, world=world)
    config = get_variant("tiny", vocab_size=512, max_seq_len=128, dtype="float32")
    save_model(root / "policy", config, random_params(config, "lm", 0, tokenizer.eos_id),
               head="lm")
    for seed, kind in enumerate(("helpfulness", "safety"), start=1):
        save_model(root / kind, config, random_params(config, "scalar", seed), head="scalar",
                   metadata={"kind": kind})
    prompts = [Prompt(p.messages, p.is_safety_prompt) for p in world.prompts(12, seed=1)]
    return {
        "tokenizer": tokenizer,
        "policy_init": str(root / "policy"),
        "reward_models": {"helpfulness": str(root / "helpfulness"),
                          "safety": str(root / "safety")},
        "prompts": prompts,
    }


def run_config(**changes):
    config = rs_configs.get_config("tiny,smoke")
    with config.unlocked():
        config.synthetic.enabled = False
        config.max_prompts = 0
        config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
        config.num_devices = 1
        config.sampling.num_samples = 4
        config.sampling.max_new_tokens = 8
        config.sampling.prompt_batch_size = 4
        config.finetune.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
        config.finetune.num_devices = 1
        config.finetune.data.max_length = 64
        for name, value in changes.items():
            target = config
            *parents, leaf = name.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
    config.lock()
    return config


def run(config, workdir, setup, **kwargs):
    return rs.run_rejection_sampling(
        config, workdir, policy_init=setup["policy_init"],
        reward_models=setup["reward_models"], prompts=setup["prompts"],
        tokenizer=setup["tokenizer"], **kwargs)


class Interrupt(Exception):
    pass


def shared_sampler_and_scorer(config, setup):
    """Factories for `run_sampling` that build one sampler and scorer and return them on every
    call, so that several runs in a test compile the sampler once."""
    tokenizer = setup["tokenizer"]
    built = {}

    def make_sampler():
        if "sampler" not in built:
            built["sampler"] = rs.make_sampler(setup["policy_init"], config, tokenizer,
                                               rs.create_mesh(config))
        return built["sampler"]

    def make_scorer():
        if "scorer" not in built:
            built["scorer"] = rs.load_reward_scorer(setup["reward_models"], tokenizer, config,
                                                    None)
        return built["scorer"]

    return make_sampler, make_scorer


def test_sampling_resumes_without_resampling(tiny_setup, tmp_path):
    config = run_config()
    tokenizer = tiny_setup["tokenizer"]
    prompt_set = rs.prepare_prompts(tiny_setup["prompts"], tokenizer, 48)
    make_sampler, make_scorer = shared_sampler_and_scorer(config, tiny_setup)

    def sample(directory, stop_after=None):
        calls = []

        def hook(index):
            calls.append(index)
            if index == stop_after:
                raise Interrupt

        try:
            rs.run_sampling(config, directory, prompt_set, tokenizer, make_sampler, make_scorer,
                            on_batch=hook)
        except Interrupt:
            pass
        return calls

    # 12 prompts in batches of 4: the interrupted run writes batches 0 and 1, the rerun only 2.
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    assert sample(resumed, stop_after=1) == [0, 1]
    written = {index: (rs.batch_path(resumed, index).read_bytes(),
                       rs.batch_path(resumed, index).stat().st_mtime_ns) for index in (0, 1)}
    assert not rs.batch_path(resumed, 2).exists()
    assert sample(resumed) == [2]
    for index, (content, mtime) in written.items():
        assert rs.batch_path(resumed, index).read_bytes() == content
        assert rs.batch_path(resumed, index).stat().st_mtime_ns == mtime
    assert sample(resumed) == []

    # An uninterrupted run draws the same samples, because batch b's randomness is a function
    # of (seed, iteration, b) alone.
    assert sample(fresh) == [0, 1, 2]
    for index in range(3):
        assert (rs.batch_path(resumed, index).read_text()
                == rs.batch_path(fresh, index).read_text())


def test_run_end_to_end(tiny_setup, tmp_path):
    # The experiment's entry point, with every input given as a path in the config.
    prompt_file = tmp_path / "prompts.jsonl"
    write_prompts_jsonl(prompt_file, tiny_setup["prompts"])
    config = run_config(**{
        "policy_init": tiny_setup["policy_init"],
        "tokenizer": tiny_setup["tokenizer"].source,
        "reward_models.helpfulness": tiny_setup["reward_models"]["helpfulness"],
        "reward_models.safety": tiny_setup["reward_models"]["safety"],
        "prompts": str(prompt_file),
    })
    workdir = tmp_path / "rs"
    summary = rs.train_and_evaluate(config, workdir)
    samples_dir = workdir / rs.SAMPLES_DIR
    batch_files = sorted(samples_dir.glob("batch_*.json"))
    assert [path.name for path in batch_files] == [
        "batch_000000.json", "batch_000001.json", "batch_000002.json"]

    # Outputs.
    assert summary["sampling"]["num_prompts"] == 12
    assert summary["sampling"]["num_samples"] == 4
    selected = rs.read_selections_jsonl(workdir / rs.SELECTED_FILE)
    assert len(selected) == summary["selection"]["selected"] > 0
    assert (workdir / rs.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    curves = json.loads((workdir / rs.CURVES_FILE).read_text())
    assert curves["n"] == [1, 2, 3, 4]
    # N = 1: max and median of one sample are both the mean score.
    assert curves["max"][0] == pytest.approx(curves["median"][0])
    assert all(b >= a - 1e-12 for a, b in zip(curves["max"], curves["max"][1:], strict=False))
    assert curves["max"][-1] > curves["median"][-1]
    model = load_model(workdir / rs.MODEL_DIR)
    assert model.head == "lm"
    assert model.metadata["stage"] == "rejection_sampling"
    assert model.metadata["num_selected"] == len(selected)
    assert summary["finetune"]["steps"] == 2
    assert not (workdir / rs.FINETUNE_DIR / "model").exists()

    # Each selected answer is its prompt's best eligible sample in the batch files.
    results = {}
    for index in range(3):
        for result in rs.load_batch(samples_dir, index):
            results[result["key"]] = result
    for chosen in selected:
        result = results[chosen.key]
        eligible = [k for k in range(4) if result["finished"][k] and result["responses"][k]]
        assert chosen.score == max(result["scores"][k] for k in eligible)
        assert chosen.answer == result["responses"][chosen.sample_index]
        assert chosen.iteration == 1
        assert chosen.reward_models == tiny_setup["reward_models"]

    # A finished run returns its summary without sampling or training again.
    written = {path: path.stat().st_mtime_ns for path in batch_files}
    assert rs.train_and_evaluate(config, workdir) == summary

    # Without the summary (a crash after fine-tuning) the rerun reuses the samples and the
    # final fine-tuning checkpoint.
    (workdir / rs.SUMMARY_FILE).unlink()
    again = rs.train_and_evaluate(config, workdir)
    assert {path: path.stat().st_mtime_ns for path in batch_files} == written
    assert again["best_of_n"] == summary["best_of_n"]
    assert rs.read_selections_jsonl(workdir / rs.SELECTED_FILE) == selected
    assert load_model(workdir / rs.MODEL_DIR).metadata["steps"] == 2

    # Changed sampling settings are rejected instead of mixing samples.
    with config.unlocked():
        config.sampling.temperature = 0.7
    with pytest.raises(ValueError, match="other settings .*sampling"):
        rs.train_and_evaluate(config, workdir)
    assert json.loads((workdir / "config.json").read_text())["sampling"]["temperature"] == 1.0
    with config.unlocked():
        config.sampling.temperature = 1.0

    # The gold scorer of the synthetic world measures samples, selections and both policies.
    world = synthetic.SyntheticWorld(seed=0, num_animals=4)
    setup = SyntheticSetup(
        world=world, tokenizer=tiny_setup["tokenizer"],
        policy_dir=tiny_setup["policy_init"],
        helpfulness_dir=tiny_setup["reward_models"]["helpfulness"],
        safety_dir=tiny_setup["reward_models"]["safety"],
        train_prompts=tiny_setup["prompts"], eval_prompts=tiny_setup["prompts"][:4],
        gold_scorer=GoldScorer(world))
    evaluation = rs.evaluate_with_gold_scorer(setup, workdir, again, config,
                                              tiny_setup["policy_init"])
    expected_selected = setup.gold_metrics([Prompt(s.prompt, s.is_safety_prompt)
                                            for s in selected], [s.answer for s in selected])
    assert evaluation["selected"] == expected_selected
    all_answers = [answer for result in results.values() for answer in result["responses"]]
    assert len(all_answers) == 48
    assert set(evaluation) == {"fingerprint", "all_samples", "selected", "initial_policy",
                               "fine_tuned_policy"}
    assert 0.0 <= evaluation["fine_tuned_policy"]["gold"] <= 1.0
    assert json.loads((workdir / "evaluation.json").read_text()) == evaluation


def test_pooling_rescores_with_current_reward_models(tiny_setup, tmp_path):
    tokenizer = tiny_setup["tokenizer"]
    config = run_config()
    scorer = rs.load_reward_scorer(tiny_setup["reward_models"], tokenizer, config, None)
    prompts = tiny_setup["prompts"][:3]

    def answers(texts, stored_scores, iteration):
        return [rs.Selection(messages=(*p.dialog, Message("assistant", text)),
                             is_safety_prompt=p.is_safety_prompt, score=score,
                             iteration=iteration)
                for p, text, score in zip(prompts, texts, stored_scores, strict=True)]

    # Stored scores of the older iteration are high, but rescoring replaces them.
    older = answers(["The cat is red.", "I can't help with that.", "One two three."],
                    [0.99, 0.99, 0.99], 1)
    current = answers(["The dog is blue.", "No.", "Four five six."], [0.0, 0.0, 0.0], 2)
    path = tmp_path / "old.jsonl"
    rs.write_selections_jsonl(path, older)

    pooled, counts = rs.build_selected_set(
        current, [path], pool=True, rescore_previous=True, make_scorer=lambda: scorer,
        tokenizer=tokenizer)

    # Expected: the reward models applied directly to each dialogue's chat-format ids.
    def direct(selection):
        prompt_ids, answer_ids = rs.encode_selection(tokenizer, selection)
        return scorer.score([prompt_ids], [answer_ids], [selection.is_safety_prompt])["score"][0]

    kept_by_key = {kept.key: kept for kept in pooled}
    for old, new in zip(older, current, strict=True):
        old_score, new_score = direct(old), direct(new)
        kept = kept_by_key[new.key]
        assert kept.answer == (old if old_score > new_score else new).answer
        assert kept.score == pytest.approx(max(old_score, new_score), rel=1e-5)
        assert kept.reward_models == tiny_setup["reward_models"]
    assert counts["pooled"] == 3
    assert counts["kept_from_current"] + counts["kept_from_previous"] == 3

    # Without rescoring, the stored 0.99 scores win every prompt.
    pooled, counts = rs.build_selected_set(
        current, [path], pool=True, rescore_previous=False, make_scorer=None,
        tokenizer=tokenizer)
    assert [s.iteration for s in pooled] == [1, 1, 1]
    assert counts["kept_from_previous"] == 3


def test_prepare_prompts_drops_long_and_duplicate_prompts(tiny_setup):
    tokenizer = tiny_setup["tokenizer"]
    prompts = tiny_setup["prompts"][:3]
    long_prompt = Prompt((Message("user", " ".join(["cat"] * 200)),), False)
    prompt_set = rs.prepare_prompts([*prompts, prompts[0], long_prompt], tokenizer, 48)
    assert len(prompt_set) == 3
    assert prompt_set.num_duplicates == 1
    assert prompt_set.num_too_long == 1
    with pytest.raises(ValueError, match="longer than max_prompt_length"):
        rs.prepare_prompts([long_prompt], tokenizer, 48)
    with pytest.raises(TypeError, match="not token ids"):
        rs.prepare_prompts([Prompt((1, 2, 3))], tokenizer, 48)


def test_reward_scorer_rejects_small_vocabulary(tiny_setup, tmp_path):
    config = get_variant("tiny", vocab_size=64, max_seq_len=64)
    save_model(tmp_path / "small", config, random_params(config, "scalar", 0), head="scalar")
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        rs.load_reward_scorer({"helpfulness": tmp_path / "small"}, tiny_setup["tokenizer"],
                              run_config(), None)
    with pytest.raises(ValueError, match="'helpfulness'] is required"):
        rs.load_reward_scorer({"safety": tmp_path / "small"}, tiny_setup["tokenizer"],
                              run_config(), None)

