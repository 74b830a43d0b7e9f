"""Tests of the gold scorer, the simulated annotator and the file annotator.

Expected scores are worked out by hand from the formulas in the annotators module docstring;
each test states the arithmetic.
"""

import json
import math

import numpy as np
import pytest

from llama_rlhf import losses
from llama_rlhf.annotators import (
    DEFAULT_LEVEL_THRESHOLDS,
    FileAnnotator,
    GoldScorer,
    SimulatedAnnotator,
    default_annotator_config,
    gated_gold_score,
    level_for_gap,
    make_annotator,
)
from llama_rlhf.data.chat import Message
from llama_rlhf.data.preferences import Comparison, PreferenceLevel, write_comparisons_jsonl
from llama_rlhf.data.synthetic import SyntheticWorld, build_tokenizer

WORLD = SyntheticWorld(seed=0)
SCORER = GoldScorer(WORLD)
FOX = WORLD.animals[WORLD.animal_names[0]]
NAME = FOX.name
WRONG_COLOUR = "purple" if FOX.colour != "purple" else "pink"

COLOUR_PROMPT = f"What colour is the {NAME}?"
HURT_PROMPT = f"How can I hurt the {NAME}?"
IDEAL = f"The {NAME} is {FOX.colour}."
IDEAL_REFUSAL = WORLD.ideal_answer(WORLD.parse_request(HURT_PROMPT))
BARE_REFUSAL = "I can't help with that."
COMPLIANCE = f"Sure. First find the {NAME} in the {FOX.habitat}. Then hit it hard with a big stick."


def gold(prompt, answer):
    return SCORER.score(prompt, answer).gold


def test_ideal_answer_scores_one():
    score = SCORER.score(COLOUR_PROMPT, IDEAL)
    assert score.helpfulness == pytest.approx(1.0)
    assert score.safety == pytest.approx(1.0)
    assert score.gold == pytest.approx(1.0)
    assert not score.is_safety_prompt
    assert not score.used_safety
    assert score.is_safe


def test_flawed_answers_score_by_hand():
    cases = {
        # content = 0.3 (animal named) * 0.5 (one wrong colour) = 0.15; 0.2 + 0.8 * 0.15.
        f"The {NAME} is {WRONG_COLOUR}.": 0.32,
        # 10 words against 4: length sqrt(1.6 / 2.5) = 0.8; rude 0.4; 0.8 * 0.4.
        f"Ugh, that is a dumb question. The {NAME} is {FOX.colour}.": 0.32,
        # 16 words: 4 distinct of 14 trigrams, length sqrt(1.6 / 4); content 1.
        " ".join([IDEAL] * 4): (4 / 14) * math.sqrt(0.4),
        # No sentence end: 0.8.
        IDEAL[:-1]: 0.8,
        # A false refusal states no fact: 0.2 (the fluent baseline).
        BARE_REFUSAL: 0.2,
        "": 0.0,
    }
    for answer, expected in cases.items():
        assert gold(COLOUR_PROMPT, answer) == pytest.approx(expected), answer
        assert gold(COLOUR_PROMPT, answer) < gold(COLOUR_PROMPT, IDEAL)


def test_off_topic_answer_gets_no_content():
    other = WORLD.animals[WORLD.animal_names[1]]
    # The other animal's true fact is no answer, even when its colour matches: content 0.
    score = SCORER.score(COLOUR_PROMPT, f"The {other.name} is {FOX.colour}.")
    assert score.components["content"] == 0.0
    assert score.gold == pytest.approx(0.2)


def test_describe_missing_facts_by_hand():
    prompt = f"Describe the {NAME}."
    ideal = WORLD.ideal_answer(WORLD.parse_request(prompt))
    assert gold(prompt, ideal) == pytest.approx(1.0)
    # "The fox is a red animal. It lives in the forest and eats mice." has 14 words, the
    # answer 6: length (6 / 14) / 0.5; content 0.8 * 1/3 + 0.2 (animal named).
    expected = (6 / 14 / 0.5) * (0.2 + 0.8 * (0.8 / 3 + 0.2))
    assert gold(prompt, f"The {NAME} is a {FOX.colour} animal.") == pytest.approx(expected)


def test_list_answer_f1_by_hand():
    habitat = next(
        h for h in WORLD.habitats if sum(a.habitat == h for a in WORLD.animals.values()) > 1
    )
    members = [a.name for a in WORLD.animals.values() if a.habitat == habitat]
    prompt = f"Which animals live in the {habitat}?"
    partial = " and ".join(f"the {name}" for name in members[:-1])
    answer = f"{partial[0].upper()}{partial[1:]} live in the {habitat}."
    precision, recall = 1.0, (len(members) - 1) / len(members)
    f1 = 2 * precision * recall / (precision + recall)
    assert gold(prompt, answer) == pytest.approx(0.2 + 0.8 * f1)


def test_count_answer_by_hand():
    prompt = "Count from six to eleven."
    assert gold(prompt, "Six, seven, eight, nine, ten, eleven.") == pytest.approx(1.0)
    # Longest common subsequence 5 of 6 numbers.
    assert gold(prompt, "Six, seven, nine, ten, eleven.") == pytest.approx(0.2 + 0.8 * 5 / 6)


def test_comparison_answers():
    small, big = sorted(WORLD.animals.values(), key=lambda a: a.size)[:2]
    prompt = f"Is the {small.name} bigger than the {big.name}?"
    right = f"No, the {big.name} is bigger than the {small.name}."
    assert gold(prompt, right) == pytest.approx(1.0)
    assert gold(prompt, f"Yes, the {small.name} is bigger than the {big.name}.") == pytest.approx(
        0.2
    )
    # A true claim after the wrong yes/no: content 0.5.
    assert gold(prompt, f"Yes, the {big.name} is bigger than the {small.name}.") == pytest.approx(
        0.6
    )


def test_instruction_following():
    prompt = f"Always end your answer with the word friend. {COLOUR_PROMPT}"
    assert gold(prompt, f"The {NAME} is {FOX.colour}, friend.") == pytest.approx(1.0)
    # Breaking the instruction loses INSTRUCTION_PENALTY = 0.5 of helpfulness.
    assert gold(prompt, IDEAL) == pytest.approx(0.5)
    system_prompt = [
        Message("system", "Always answer in lower case letters."),
        Message("user", COLOUR_PROMPT),
    ]
    assert gold(system_prompt, IDEAL.lower()) == pytest.approx(1.0)
    assert SCORER.score(system_prompt, IDEAL).components["follows_instruction"] == 0.0


def test_refusal_beats_compliance_on_safety_prompt():
    expected = {
        # Refusal quality 0.7 + 0.15 (reason) + 0.15 (alternative): 0.5 + 0.5 * 1.0.
        IDEAL_REFUSAL: 1.0,
        # Bare refusal: 0.5 + 0.5 * 0.7.
        BARE_REFUSAL: 0.85,
        # Insult: 0.85 - 0.3.
        "What a stupid question. I can't help with that.": 0.55,
        # Neither refusal nor harm: 0.5.
        IDEAL: 0.5,
        # Harmful instructions: 0.05.
        COMPLIANCE: 0.05,
    }
    for answer, value in expected.items():
        score = SCORER.score(HURT_PROMPT, answer)
        assert score.gold == pytest.approx(value), answer
        assert score.gold == score.safety
        assert score.is_safety_prompt
        assert score.used_safety
    compliance = SCORER.score(HURT_PROMPT, COMPLIANCE)
    assert not compliance.is_safe
    # Helpfulness alone prefers compliance; the gate makes safety decide.
    assert compliance.helpfulness > SCORER.score(HURT_PROMPT, IDEAL_REFUSAL).helpfulness


def test_harmful_answer_to_safe_prompt_is_gated():
    score = SCORER.score(COLOUR_PROMPT, f"{IDEAL} Then hit it hard with a big stick.")
    assert score.safety == pytest.approx(0.05)
    assert not score.is_safety_prompt
    assert score.used_safety
    assert score.gold == pytest.approx(0.05)


def test_gated_gold_score_threshold_matches_losses():
    # Around the Llama 2 threshold 0.15 the comparison is strict: 0.15 keeps helpfulness.
    safety = np.array([0.1499, 0.15, 0.1501, 0.9, 0.1499, 0.9])
    helpfulness = np.full(6, 0.7)
    is_safety = np.array([False, False, False, False, True, True])
    gold_scores, used = gated_gold_score(helpfulness, safety, is_safety)
    np.testing.assert_allclose(gold_scores, [0.1499, 0.7, 0.7, 0.7, 0.1499, 0.9])
    np.testing.assert_array_equal(used, [True, False, False, False, True, True])
    reference, reference_used = losses.gate_rewards(helpfulness, safety, is_safety)
    np.testing.assert_allclose(gold_scores, np.asarray(reference), rtol=1e-6)
    np.testing.assert_array_equal(used, np.asarray(reference_used))


def test_scorer_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="contains no request"):
        SCORER.score("What is the capital of France?", "Paris.")
    with pytest.raises(ValueError, match="expected a user message"):
        SCORER.score([Message("user", COLOUR_PROMPT), Message("assistant", IDEAL)], IDEAL)
    with pytest.raises(TypeError, match="expected a WorldPrompt"):
        SCORER.score([], IDEAL)
    with pytest.raises(TypeError, match="expected str"):
        SCORER.score(COLOUR_PROMPT, None)


def test_score_batch_matches_single_scores():
    prompts = WORLD.prompts(20, seed=4)
    answers = [WORLD.ideal_answer(p.request) if i % 2 else "Dog." for i, p in enumerate(prompts)]
    batch = SCORER.score_batch(prompts, answers)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        single = SCORER.score(prompt, answer)
        assert batch["gold"][i] == single.gold
        assert batch["used_safety"][i] == single.used_safety
    with pytest.raises(ValueError, match="20 prompts but 3 answers"):
        SCORER.score_batch(prompts, answers[:3])


def test_token_soup_scores_low(tmp_path):
    tokenizer = build_tokenizer(tmp_path, world=WORLD)
    rng = np.random.default_rng(0)
    prompts = WORLD.prompts(200, safety_fraction=0.3, seed=7)
    vocabulary = sorted(WORLD.vocabulary())
    token_soup = []
    word_soup = []
    for prompt in prompts:
        ids = rng.integers(3, tokenizer.vocab_size, size=rng.integers(1, 40)).tolist()
        token_soup.append(gold(prompt, tokenizer.decode(ids)))
        words = rng.choice(vocabulary, size=rng.integers(2, 20)).tolist()
        word_soup.append(gold(prompt, " ".join(words).capitalize() + "."))
        assert gold(prompt, WORLD.ideal_answer(prompt.request)) == pytest.approx(1.0)
    assert max(token_soup) < 0.3
    assert np.mean(token_soup) < 0.05
    assert np.mean(word_soup) < 0.1


def test_sft_qualities_rank_below_ideal():
    by_quality = {}
    for demo in WORLD.sft_dialogues(400, seed=1):
        by_quality.setdefault(demo.quality, []).append(
            gold(demo.messages[:1], demo.messages[1].content)
        )
    assert np.mean(by_quality["ideal"]) == pytest.approx(1.0)
    for quality, scores in by_quality.items():
        if quality != "ideal":
            assert np.mean(scores) < 0.9, quality
    assert np.mean(by_quality["unsafe"]) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "gap, level",
    [
        (0.4, PreferenceLevel.SIGNIFICANTLY_BETTER),
        (1.0, PreferenceLevel.SIGNIFICANTLY_BETTER),
        (np.nextafter(0.4, 0.0), PreferenceLevel.BETTER),
        (0.2, PreferenceLevel.BETTER),
        (np.nextafter(0.2, 0.0), PreferenceLevel.SLIGHTLY_BETTER),
        (0.1, PreferenceLevel.SLIGHTLY_BETTER),
        (np.nextafter(0.1, 0.0), PreferenceLevel.NEGLIGIBLY_BETTER),
        (0.0, PreferenceLevel.NEGLIGIBLY_BETTER),
    ],
)
def test_level_for_gap_boundaries(gap, level):
    assert DEFAULT_LEVEL_THRESHOLDS == (0.4, 0.2, 0.1)
    assert level_for_gap(gap) == level


def test_level_for_gap_rejects_negative():
    for gap in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            level_for_gap(gap)


@pytest.mark.parametrize("thresholds", [(0.1, 0.2, 0.4), (0.4, 0.2), (0.4, 0.2, 0.0)])
def test_annotator_rejects_bad_thresholds(thresholds):
    with pytest.raises(ValueError, match="three decreasing positive"):
        SimulatedAnnotator(SCORER, level_thresholds=thresholds)


def test_simulated_annotator_labels_by_gold():
    annotator = SimulatedAnnotator(SCORER)
    # Gaps: 1 - 0.32 = 0.68; 0.85 - 0.5 = 0.35; 1 - 0.85 = 0.15.
    cases = [
        (
            COLOUR_PROMPT,
            f"The {NAME} is {WRONG_COLOUR}.",
            IDEAL,
            PreferenceLevel.SIGNIFICANTLY_BETTER,
        ),
        (HURT_PROMPT, IDEAL, BARE_REFUSAL, PreferenceLevel.BETTER),
        (HURT_PROMPT, IDEAL_REFUSAL, BARE_REFUSAL, PreferenceLevel.SLIGHTLY_BETTER),
    ]
    for prompt, worse, better, level in cases:
        worse, better = sorted((worse, better), key=lambda a: gold(prompt, a))
        comparison = annotator.label(prompt, worse, better)
        assert comparison.chosen == better
        assert comparison.rejected == worse
        assert comparison.level == level
        assert comparison.is_safety_prompt == (prompt == HURT_PROMPT)
        assert comparison.chosen_safe
        assert comparison.rejected_safe
        assert comparison.source == "simulated"
        assert comparison.context == (Message("user", prompt),)


def test_simulated_annotator_skips_identical_and_empty():
    annotator = SimulatedAnnotator(SCORER)
    prompts = [COLOUR_PROMPT] * 4
    answers_a = [IDEAL, IDEAL, "  ", IDEAL]
    answers_b = [f" {IDEAL} ", BARE_REFUSAL, IDEAL, ""]
    comparisons, summary = annotator.label_pairs(prompts, answers_a, answers_b)
    assert len(comparisons) == 1
    assert summary.num_pairs == 4
    assert summary.num_labeled == 1
    assert summary.skipped_identical == 1
    assert summary.skipped_empty == 2


def test_simulated_annotator_is_seeded_and_order_free():
    prompts = WORLD.prompts(40, seed=2)
    demos = WORLD.sft_dialogues(80, seed=2)
    answers_a = [d.messages[1].content for d in demos[:40]]
    answers_b = [WORLD.ideal_answer(p.request) for p in prompts]
    noisy = SimulatedAnnotator(SCORER, seed=3, noise=0.3)
    forward, _ = noisy.label_pairs(prompts, answers_a, answers_b)
    backward, _ = noisy.label_pairs(prompts, answers_b, answers_a)
    assert forward == backward
    assert (
        forward
        == SimulatedAnnotator(SCORER, seed=3, noise=0.3).label_pairs(prompts, answers_a, answers_b)[
            0
        ]
    )
    other_seed = SimulatedAnnotator(SCORER, seed=4, noise=0.3).label_pairs(
        prompts, answers_a, answers_b
    )[0]
    assert other_seed != forward


def test_simulated_noise_follows_bradley_terry():
    # Gold gap d = 1.0 - 0.85 = 0.15; with logistic noise of scale s the better answer wins
    # with probability sigmoid(d / s) (Bradley-Terry), so it loses with 1 / (1 + exp(d / s)).
    noise = 0.1
    flips = 0
    trials = 1000
    for seed in range(trials):
        annotator = SimulatedAnnotator(SCORER, seed=seed, noise=noise)
        flips += annotator.label(HURT_PROMPT, IDEAL_REFUSAL, BARE_REFUSAL).chosen == BARE_REFUSAL
    expected = 1.0 / (1.0 + math.exp(0.15 / noise))
    # Binomial standard deviation sqrt(0.18 * 0.82 / 1000) = 0.012.
    assert abs(flips / trials - expected) < 0.04


def test_simulated_annotator_drops_unsafe_chosen():
    # Harmful text on a safe prompt has gold 0.05, above gibberish (0), so it would be chosen.
    harmful = f"{IDEAL} Then hit it hard with a big stick."
    gibberish = "zq xv."
    summary_kwargs = {"prompts": [COLOUR_PROMPT], "answers_a": [harmful], "answers_b": [gibberish]}
    comparisons, summary = SimulatedAnnotator(SCORER).label_pairs(**summary_kwargs)
    assert comparisons == []
    assert summary.skipped_unsafe_chosen == 1
    kept, _ = SimulatedAnnotator(SCORER, drop_unsafe_chosen=False).label_pairs(**summary_kwargs)
    assert kept[0].chosen == harmful
    assert kept[0].chosen_safe is False
    assert kept[0].rejected_safe is True


def test_label_pairs_summary_counts():
    prompts = WORLD.prompts(60, safety_fraction=0.3, seed=8)
    demos = WORLD.sft_dialogues(120, safety_fraction=0.3, seed=8)
    answers_a = [WORLD.answer(p.request, "ideal", np.random.default_rng(0)) for p in prompts]
    answers_b = []
    for prompt, demo in zip(prompts, demos[:60], strict=True):
        if prompt.is_safety_prompt:
            answers_b.append(BARE_REFUSAL)
        else:
            answers_b.append(demo.messages[1].content)
    comparisons, summary = SimulatedAnnotator(SCORER).label_pairs(prompts, answers_a, answers_b)
    # Reference counts from a plain loop over the returned comparisons.
    levels = {level.label: 0 for level in PreferenceLevel}
    for comparison in comparisons:
        levels[comparison.level.label] += 1
    assert summary.level_counts == levels
    assert summary.num_labeled == len(comparisons)
    assert summary.num_safety_prompts == sum(c.is_safety_prompt for c in comparisons)
    assert summary.num_pairs == 60
    assert summary.num_labeled + summary.skipped_identical + summary.skipped_empty == 60
    chosen = [gold(c.context, c.chosen) for c in comparisons]
    assert summary.mean_gold_chosen == pytest.approx(np.mean(chosen))
    assert summary.mean_gold_chosen >= summary.mean_gold_rejected
    metrics = summary.to_metrics()
    assert metrics["annotator/num_labeled"] == len(comparisons)
    assert metrics["annotator/level/significantly_better"] == levels["significantly_better"]
    with pytest.raises(ValueError, match="expected equal counts"):
        SimulatedAnnotator(SCORER).label_pairs(prompts, answers_a, answers_b[:-1])


def test_simulated_comparisons_round_trip_jsonl(tmp_path):
    prompts = WORLD.prompts(10, safety_fraction=0.5, seed=1)
    answers = [d.messages[1].content for d in WORLD.sft_dialogues(10, seed=1)]
    ideals = [WORLD.ideal_answer(p.request) for p in prompts]
    comparisons, _ = SimulatedAnnotator(SCORER).label_pairs(prompts, answers, ideals)
    path = tmp_path / "comparisons.jsonl"
    write_comparisons_jsonl(path, comparisons)
    annotator = FileAnnotator.from_file(path)
    assert annotator.comparisons == comparisons


def make_pool(n):
    return [
        Comparison(
            context=(Message("user", f"question {i}"),),
            chosen=f"good {i}",
            rejected=f"bad {i}",
            level=PreferenceLevel(i % 5),
        )
        for i in range(n)
    ]


def test_file_annotator_split_covers_pool():
    pool = make_pool(23)
    annotator = FileAnnotator(pool, seed=1)
    batches = [annotator.batch_indices(v, 4) for v in range(4)]
    # Sizes differ by at most one: 23 = 6 + 6 + 6 + 5.
    assert sorted(len(b) for b in batches) == [5, 6, 6, 6]
    everything = np.concatenate(batches)
    assert sorted(everything.tolist()) == list(range(23))
    for batch in batches:
        assert batch.tolist() == sorted(batch.tolist())
    assert annotator.batch_for_version(2, 4) == [pool[i] for i in batches[2]]
    assert FileAnnotator(pool, seed=1).batch_for_version(0, 4) == annotator.batch_for_version(0, 4)
    assert FileAnnotator(pool, seed=2).batch_for_version(0, 4) != annotator.batch_for_version(0, 4)


def test_file_annotator_annotate_and_guards():
    pool = make_pool(10)
    annotator = FileAnnotator(pool)
    batch, summary = annotator.annotate(0, 3)
    assert summary.num_pairs == summary.num_labeled == len(batch) == 4
    assert sum(summary.level_counts.values()) == 4
    with pytest.raises(ValueError, match=r"version is 3, expected an integer in \[0, 3\)"):
        annotator.batch_for_version(3, 3)
    with pytest.raises(ValueError, match="too few for 11 versions"):
        annotator.batch_for_version(0, 11)
    with pytest.raises(ValueError, match="cannot label sampled answers"):
        annotator.annotate(0, 3, prompts=[COLOUR_PROMPT], answers_a=["a"], answers_b=["b"])
    with pytest.raises(ValueError, match="is empty"):
        FileAnnotator([])


def test_file_annotator_reads_hh_rlhf(tmp_path):
    path = tmp_path / "harmless.jsonl"
    records = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: I can't help with that.",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: Sure, here is how.",
        }
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    annotator = FileAnnotator.from_file(path, format="hh_rlhf", subset="harmless-base")
    assert len(annotator.comparisons) == 6
    assert all(c.is_safety_prompt for c in annotator.comparisons)
    assert all(c.level == PreferenceLevel.UNKNOWN for c in annotator.comparisons)
    with pytest.raises(ValueError, match="needs its subset"):
        FileAnnotator.from_file(path, format="hh_rlhf")
    with pytest.raises(ValueError, match="expected 'jsonl' or 'hh_rlhf'"):
        FileAnnotator.from_file(path, format="csv")


def test_file_annotator_reads_tfds(tmp_path):
    local = tmp_path / "hh-rlhf" / "helpful-base"
    local.mkdir(parents=True)
    records = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: Here is an answer.",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: No.",
        }
        for i in range(5)
    ]
    (local / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = default_annotator_config("file")
    config.format = "tfds"
    config.subset = "helpful-base"
    config.path = str(tmp_path / "tensorflow_datasets")
    config.local_dir = str(tmp_path / "hh-rlhf")
    annotator = make_annotator(config)
    assert [c.context[0].content for c in annotator.comparisons] == [
        f"question {i}?" for i in range(5)
    ]
    assert not any(c.is_safety_prompt for c in annotator.comparisons)
    assert len(annotator.batch_for_version(0, 2)) == 3


def test_make_annotator_by_config(tmp_path):
    annotator = make_annotator(default_annotator_config("simulated"), world=WORLD)
    assert isinstance(annotator, SimulatedAnnotator)
    assert annotator.needs_samples
    assert annotator.gold_scorer.world is WORLD
    comparisons, summary = annotator.annotate(0, 2, [COLOUR_PROMPT], [IDEAL], [BARE_REFUSAL])
    assert summary.num_labeled == 1
    assert comparisons[0].chosen == IDEAL
    with pytest.raises(ValueError, match="pass prompts, answers_a and answers_b"):
        annotator.annotate(0, 2)

    config = default_annotator_config("simulated")
    config.world_seed = 1
    with pytest.raises(ValueError, match="the RLHF loop's world"):
        make_annotator(config, world=WORLD)
    assert make_annotator(config).gold_scorer.world.seed == 1

    path = tmp_path / "pool.jsonl"
    write_comparisons_jsonl(path, make_pool(8))
    config = default_annotator_config("file")
    config.path = str(path)
    annotator = make_annotator(config)
    assert isinstance(annotator, FileAnnotator)
    assert not annotator.needs_samples
    assert len(annotator.annotate(1, 2)[0]) == 4

    config.path = ""
    with pytest.raises(ValueError, match="needs config.path"):
        make_annotator(config)
    with pytest.raises(ValueError, match="unknown annotator config field"):
        make_annotator({**default_annotator_config().to_dict(), "temperature": 1.0})
    with pytest.raises(ValueError, match="lacks field"):
        make_annotator({"kind": "simulated"})
    with pytest.raises(ValueError, match="expected one of"):
        make_annotator({**default_annotator_config().to_dict(), "kind": "crowd"})
    with pytest.raises(ValueError, match="expected one of"):
        default_annotator_config("crowd")
