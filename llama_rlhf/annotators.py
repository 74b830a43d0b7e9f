"""Annotators that supply preference comparisons to each version of the iterative RLHF loop.

Two kinds, chosen by name in the config (`make_annotator`):
  * "file": a static pool of human comparisons (the project's JSONL with levels, Anthropic
    HH-RLHF JSONL, or HH-RLHF through tensorflow-datasets), split deterministically into one
    batch per version.
  * "simulated": a fixed gold judge labels pairs of answers sampled from the latest policy,
    standing in for human raters as in reward-model overoptimization studies. Every version
    then collects fresh comparisons of the latest model, as Llama 2's weekly batches did.

The gold scorer (`GoldScorer`) judges answers to the prompts of a `SyntheticWorld`. Both of
its parts lie in [0, 1].

Helpfulness = style * (FLUENT_BASELINE + (1 - FLUENT_BASELINE) * content), and half of that
(INSTRUCTION_PENALTY) is lost when the answer breaks an instruction of the prompt.
  * content: the share of the asked facts stated correctly, times WRONG_FACT_FACTOR for each
    wrong fact and each unrelated animal named, times FALSE_REFUSAL_FACTOR when the answer
    refuses a harmless request. On a safety prompt, content is 1 for compliance with the
    harmful request and 0 otherwise, because helpfulness alone rewards doing what was asked.
  * style: the product of fluency (the share of the answer's word-class bigrams, sentence
    start and end included, that occur in the world's reference texts), repetition (distinct
    word trigrams / all word trigrams), a length factor against the ideal answer,
    UNFINISHED_FACTOR when the answer stops inside a sentence, and RUDE_FACTOR for an insult.

Safety:
  * An answer with harmful instructions (a word of `HARM_WORDS`) gets HARMFUL_SAFETY, or
    HARMFUL_REFUSING_SAFETY when it also refuses, whatever the prompt.
  * Any other answer to a safety prompt gets form * (0.5 + 0.5 * refusal_quality) minus
    RUDE_SAFETY_PENALTY for an insult. Here form = fluency * repetition * finished *
    min(1, words / MIN_SAFE_ANSWER_WORDS), and refusal_quality is 0 without a refusal, else
    BARE_REFUSAL_QUALITY plus REASON_BONUS for a reason and ALTERNATIVE_BONUS for a safe
    alternative. An ideal refusal scores 1, an evasive answer 0.5, gibberish near 0.
  * Any other answer to a harmless prompt gets 1, minus RUDE_SAFETY_PENALTY for an insult.

The gold score gates the parts as Llama 2 gates its reward models: the safety part when the
prompt is a safety prompt or the safety part is below `losses.SAFETY_THRESHOLD`, else the
helpfulness part.

The simulated annotator picks the answer with the higher gold score, optionally through
Bradley-Terry noise, and rates the strength of the preference from the size of the gap.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

from llama_rlhf.data.chat import Message
from llama_rlhf.data.hh_rlhf import read_hh_rlhf_jsonl
from llama_rlhf.data.preferences import (
    Comparison,
    PreferenceLevel,
    ReadSummary,
    read_comparisons_jsonl,
)
from llama_rlhf.data.synthetic import (
    ALTERNATIVE_WORD,
    ANIMAL_POOL,
    ATTRIBUTE_KINDS,
    COLOURS,
    COMPARISON_KINDS,
    FOODS,
    HABITATS,
    HARM_WORDS,
    LEG_COUNTS,
    LIST_KINDS,
    NUMBER_WORDS,
    REASON_PHRASES,
    REFUSAL_PHRASES,
    RUDE_WORDS,
    SOUNDS,
    Request,
    SyntheticWorld,
    WorldPrompt,
    class_bigrams,
    find_instructions,
    follows_instruction,
    sentences_of,
    word_class,
    words_of,
)
from llama_rlhf.losses import SAFETY_THRESHOLD

log = logging.getLogger(__name__)

# Helpfulness.
FLUENT_BASELINE = 0.2  # helpfulness of a fluent, polite answer that states no asked fact
WRONG_FACT_FACTOR = 0.5  # content factor per wrong fact or unrelated animal
LENGTH_RANGE = (0.5, 1.6)  # answer/ideal word-count ratios that keep the full length factor
UNFINISHED_FACTOR = 0.8  # style factor for an answer that stops inside a sentence
RUDE_FACTOR = 0.4  # style factor for an answer with an insult
FALSE_REFUSAL_FACTOR = 0.5  # content factor for refusing (part of) a harmless request
INSTRUCTION_PENALTY = 0.5  # share of helpfulness lost by breaking the prompt's instruction

# Safety.
HARMFUL_SAFETY = 0.05
HARMFUL_REFUSING_SAFETY = 0.1
BARE_REFUSAL_QUALITY = 0.7
REASON_BONUS = 0.15
ALTERNATIVE_BONUS = 0.15
RUDE_SAFETY_PENALTY = 0.3
MIN_SAFE_ANSWER_WORDS = 4  # shorter answers to safety prompts lose safety in proportion

# Preference levels from the gold-score gap: a gap >= the first value is "significantly
# better", >= the second "better", >= the third "slightly better", else "negligibly better".
DEFAULT_LEVEL_THRESHOLDS = (0.4, 0.2, 0.1)

_DOMAINS: Mapping[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "habitat": HABITATS,
    "food": FOODS,
    "legs": LEG_COUNTS,
    "sound": SOUNDS,
}
_CLAIM_WORDS = ("bigger", "smaller")

Prompt = Sequence[Message] | WorldPrompt | str


def _as_messages(prompt: Prompt) -> tuple[Message, ...]:
    """Accept a WorldPrompt, a message sequence, or a bare user text."""
    if isinstance(prompt, WorldPrompt):
        return prompt.messages
    if isinstance(prompt, str):
        return (Message("user", prompt),)
    messages = tuple(prompt)
    if not messages or not all(isinstance(m, Message) for m in messages):
        raise TypeError(
            f"prompt is {prompt!r:.80}, expected a WorldPrompt, a str or a non-empty sequence "
            "of chat.Message"
        )
    return messages


def gated_gold_score(
    helpfulness: np.ndarray | float,
    safety: np.ndarray | float,
    is_safety_prompt: np.ndarray | bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Gate the two gold-score parts as Llama 2 gates its reward models, in numpy.

    gold = safety if is_safety_prompt or safety < SAFETY_THRESHOLD, else helpfulness. The
    comparison is strict, as in `llama_rlhf.losses.gate_rewards`.

    Returns:
        (gold, used_safety) as float64 and bool arrays of the broadcast shape.
    """
    helpfulness = np.asarray(helpfulness, dtype=np.float64)
    safety = np.asarray(safety, dtype=np.float64)
    used_safety = np.asarray(is_safety_prompt, dtype=bool) | (safety < SAFETY_THRESHOLD)
    return np.where(used_safety, safety, helpfulness), used_safety


@dataclasses.dataclass(frozen=True)
class GoldScore:
    """The gold scorer's judgement of one answer.

    Attributes:
        helpfulness: Helpfulness part, in [0, 1].
        safety: Safety part, in [0, 1].
        gold: The gated score: `safety` when `used_safety`, else `helpfulness`.
        is_safety_prompt: Whether the prompt's request is harmful.
        used_safety: Whether the gate chose the safety part.
        is_safe: False when the answer contains harmful instructions.
        components: The factors behind the two parts, by name, for debugging and reports:
            content, fluency, repetition, length, finished, rude, refused, harmful and
            follows_instruction (NaN when the prompt has no instruction).
    """

    helpfulness: float
    safety: float
    gold: float
    is_safety_prompt: bool
    used_safety: bool
    is_safe: bool
    components: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class _AnswerFeatures:
    """Properties of an answer that do not depend on the request, read before scoring."""

    words: list[str]
    lowered: str
    refused: bool
    harmful: bool
    rude: bool
    fluency: float
    repetition: float
    finished: float


class GoldScorer:
    """A deterministic judge of answers to the prompts of one synthetic world.

    See the module docstring for the formulas of the two parts and the gate.

    Args:
        world: The world whose facts and language define correct, fluent answers.
    """

    def __init__(self, world: SyntheticWorld):
        self.world = world
        self._bigrams = class_bigrams(world.reference_texts())

    def parse(self, prompt: Prompt) -> tuple[Request, list[str]]:
        """Return the request of the prompt's last user message and the names of the
        instructions found in its system and user messages.

        Raises:
            ValueError: If the prompt does not end with a user message or the message
                contains no request of the world.
        """
        messages = _as_messages(prompt)
        if messages[-1].role != "user":
            raise ValueError(
                f"the prompt ends with a {messages[-1].role!r} message, expected a user message"
            )
        request = self.world.parse_request(messages[-1].content)
        if request is None:
            raise ValueError(
                f"the user message {messages[-1].content!r:.120} contains no request of "
                f"{self.world!r}; the gold scorer only judges answers to the world's prompts"
            )
        return request, find_instructions(messages)

    def score(self, prompt: Prompt, answer: str) -> GoldScore:
        """Score one answer to a prompt of the world."""
        if not isinstance(answer, str):
            raise TypeError(f"answer is a {type(answer).__name__}, expected str")
        request, instructions = self.parse(prompt)
        features = self._features(answer)
        helpfulness, details = self._helpfulness(request, instructions, answer, features)
        safety = self._safety(request, features)
        gold, used_safety = gated_gold_score(helpfulness, safety, request.is_safety)
        components = {
            **details,
            "fluency": features.fluency,
            "repetition": features.repetition,
            "finished": features.finished,
            "rude": float(features.rude),
            "refused": float(features.refused),
            "harmful": float(features.harmful),
        }
        return GoldScore(
            helpfulness=float(helpfulness),
            safety=float(safety),
            gold=float(gold),
            is_safety_prompt=request.is_safety,
            used_safety=bool(used_safety),
            is_safe=not features.harmful,
            components=components,
        )

    def _features(self, answer: str) -> _AnswerFeatures:
        words = words_of(answer)
        lowered = answer.lower().replace("\u2019", "'")
        return _AnswerFeatures(
            words=words,
            lowered=lowered,
            refused=any(phrase in lowered for phrase in REFUSAL_PHRASES),
            harmful=any(w in HARM_WORDS for w in words),
            rude=any(w in RUDE_WORDS for w in words),
            fluency=self._fluency(answer),
            repetition=_repetition_factor(words),
            finished=1.0 if answer.rstrip()[-1:] in (".", "!", "?") else UNFINISHED_FACTOR,
        )

    def _helpfulness(
        self, request: Request, instructions: list[str], answer: str, features: _AnswerFeatures
    ) -> tuple[float, dict[str, float]]:
        """Return the helpfulness part and its content, length and instruction factors."""
        words = features.words
        ideal = self.world.ideal_answer(request, instructions[0] if instructions else None)
        length = _length_factor(len(words), len(words_of(ideal)))
        if request.is_safety:
            content = 1.0 if features.harmful else 0.0
        else:
            content = self._content(request, words)
            if features.refused:
                content *= FALSE_REFUSAL_FACTOR

        style = features.fluency * features.repetition * length * features.finished
        if features.rude:
            style *= RUDE_FACTOR
        helpfulness = style * (FLUENT_BASELINE + (1.0 - FLUENT_BASELINE) * content)

        follows = math.nan
        if instructions:
            follows = float(all(follows_instruction(name, answer) for name in instructions))
            helpfulness *= 1.0 - INSTRUCTION_PENALTY * (1.0 - follows)
        if not words:
            helpfulness = 0.0
        return helpfulness, {"content": content, "length": length, "follows_instruction": follows}

    def _safety(self, request: Request, features: _AnswerFeatures) -> float:
        """Return the safety part (see the module docstring)."""
        if features.harmful:
            return HARMFUL_REFUSING_SAFETY if features.refused else HARMFUL_SAFETY
        if not request.is_safety:
            return 1.0 - RUDE_SAFETY_PENALTY * features.rude

        quality = 0.0
        if features.refused:
            quality = BARE_REFUSAL_QUALITY
            quality += REASON_BONUS * any(p in features.lowered for p in REASON_PHRASES)
            quality += ALTERNATIVE_BONUS * (ALTERNATIVE_WORD in features.words)
        brevity = min(1.0, len(features.words) / MIN_SAFE_ANSWER_WORDS)
        form = features.fluency * features.repetition * features.finished * brevity
        return max(0.0, form * (0.5 + 0.5 * quality) - RUDE_SAFETY_PENALTY * features.rude)

    def score_batch(
        self, prompts: Sequence[Prompt], answers: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Score answers to prompts, one answer per prompt.

        Returns:
            Arrays of length len(prompts): "helpfulness", "safety", "gold" (float64),
            "is_safety_prompt", "used_safety", "is_safe" (bool).
        """
        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        scores = [self.score(p, a) for p, a in zip(prompts, answers, strict=True)]
        result = {}
        for name in ("helpfulness", "safety", "gold"):
            result[name] = np.array([getattr(s, name) for s in scores], dtype=np.float64)
        for name in ("is_safety_prompt", "used_safety", "is_safe"):
            result[name] = np.array([getattr(s, name) for s in scores], dtype=bool)
        return result

    def _fluency(self, text: str) -> float:
        """Share of the text's word-class bigrams (with sentence start and end) that occur in
        the world's reference texts; 0 for a text without words."""
        total = 0
        known = 0
        for sentence in sentences_of(text):
            tokens = ["<s>", *(word_class(w) for w in sentence), "</s>"]
            for bigram in zip(tokens[:-1], tokens[1:], strict=True):
                total += 1
                known += bigram in self._bigrams
        return known / total if total else 0.0

    def _content(self, request: Request, words: list[str]) -> float:
        """Share of the asked facts stated correctly, in [0, 1]."""
        facts = self.world.expected_facts(request)
        present = set(words)
        animals = present & set(ANIMAL_POOL)
        kind = request.kind

        if kind in ATTRIBUTE_KINDS or kind == "describe":
            others = len(animals - {request.animal})
            entity = float(request.animal in present)
            # A fact counts only when it is about the asked animal: the answer names it, or
            # names no animal at all ("Grey.").
            about_asked = request.animal in present or not animals
            correct = about_asked * sum(value in present for value in facts.values())
            wrong = 0
            for key, value in facts.items():
                wrong += len(present & (set(_DOMAINS[key]) - {value}))
            if kind == "describe":
                # Wrong sounds and leg counts count too; correct ones are welcome extras.
                animal = self.world.animals[request.animal]
                wrong += len(present & (set(SOUNDS) - {animal.sound}))
                wrong += len(present & (set(LEG_COUNTS) - {animal.legs}))
                share = 0.8 * correct / len(facts) + 0.2 * entity
            else:
                share = 0.7 * correct + 0.3 * entity
            return share * WRONG_FACT_FACTOR ** (wrong + others)

        if kind in COMPARISON_KINDS:
            pair = {request.animal, request.other}
            claims = _size_claims(words)
            relevant = [claim for claim in claims if set(claim) == pair]
            if not relevant:
                return 0.0
            truth = (facts["bigger"], facts["smaller"])
            share = 1.0 if all(claim == truth for claim in relevant) else 0.0
            if kind == "is_bigger":
                expected = "yes" if facts["bigger"] == request.animal else "no"
                answered = next((w for w in words if w in ("yes", "no")), None)
                if answered is None:
                    share *= 0.8
                elif answered != expected:
                    share *= WRONG_FACT_FACTOR
            return share * WRONG_FACT_FACTOR ** len(animals - pair)

        if kind in LIST_KINDS:
            target = set(facts["animals"])
            true_positives = len(target & animals)
            if true_positives == 0:
                return 0.0
            precision = true_positives / len(animals)
            recall = true_positives / len(target)
            f1 = 2 * precision * recall / (precision + recall)
            topic = request.habitat if kind == "list_habitat" else request.food
            return f1 * (0.8 + 0.2 * (topic in present))

        if kind == "count":
            numbers = [w for w in words if w in NUMBER_WORDS]
            expected = facts["numbers"]
            return _lcs_length(numbers, expected) / max(len(numbers), len(expected))

        raise ValueError(f"no content rule for request kind {kind!r}")


def _size_claims(words: list[str]) -> list[tuple[str, str]]:
    """Find "<a> is bigger|smaller than [the] <b>" and return (bigger, smaller) pairs."""
    claims = []
    for i, word in enumerate(words):
        if word not in _CLAIM_WORDS or i < 2 or words[i - 1] != "is":
            continue
        subject = words[i - 2]
        rest = words[i + 1 : i + 4]
        if not rest or rest[0] != "than":
            continue
        obj = None
        if len(rest) > 2 and rest[1] == "the":
            obj = rest[2]
        elif len(rest) > 1:
            obj = rest[1]
        if subject not in ANIMAL_POOL or obj not in ANIMAL_POOL:
            continue
        claims.append((subject, obj) if word == "bigger" else (obj, subject))
    return claims


def _repetition_factor(words: list[str]) -> float:
    """Distinct word trigrams / all word trigrams; 1 for fewer than three words."""
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if not trigrams:
        return 1.0
    return len(set(trigrams)) / len(trigrams)


def _length_factor(num_words: int, ideal_words: int) -> float:
    """1 inside LENGTH_RANGE of the ideal word count; linear below it, and
    sqrt(LENGTH_RANGE[1] / ratio) above it."""
    if num_words == 0:
        return 0.0
    ratio = num_words / max(ideal_words, 1)
    low, high = LENGTH_RANGE
    if ratio < low:
        return ratio / low
    if ratio > high:
        return math.sqrt(high / ratio)
    return 1.0


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two sequences."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def level_for_gap(
    gap: float, thresholds: Sequence[float] = DEFAULT_LEVEL_THRESHOLDS
) -> PreferenceLevel:
    """Rate a preference from the size of the score gap between chosen and rejected.

    gap >= thresholds[0]: SIGNIFICANTLY_BETTER; >= thresholds[1]: BETTER;
    >= thresholds[2]: SLIGHTLY_BETTER; otherwise NEGLIGIBLY_BETTER.

    Raises:
        ValueError: If the gap is negative or NaN.
    """
    if not gap >= 0.0:
        raise ValueError(f"score gap is {gap!r}, expected a non-negative number")
    for level, threshold in zip(
        (
            PreferenceLevel.SIGNIFICANTLY_BETTER,
            PreferenceLevel.BETTER,
            PreferenceLevel.SLIGHTLY_BETTER,
        ),
        thresholds,
        strict=True,
    ):
        if gap >= threshold:
            return level
    return PreferenceLevel.NEGLIGIBLY_BETTER


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(t) for t in thresholds)
    if len(values) != 3 or not values[0] > values[1] > values[2] > 0.0:
        raise ValueError(
            f"level_thresholds is {tuple(thresholds)!r}, expected three decreasing positive "
            "gaps (significantly better, better, slightly better)"
        )
    return values


@dataclasses.dataclass
class LabelingSummary:
    """Counts from one batch of annotation.

    Attributes:
        num_pairs: Pairs offered (or, for a file annotator, comparisons in the batch).
        num_labeled: Comparisons returned.
        skipped_identical: Pairs whose answers are equal after stripping whitespace.
        skipped_empty: Pairs with a blank answer, which a `Comparison` cannot hold.
        skipped_unsafe_chosen: Pairs whose chosen answer was unsafe and rejected answer safe.
        equal_scores: Labeled pairs whose answers got the same gold score (labeled
            NEGLIGIBLY_BETTER in a seeded random order when there is no noise).
        flipped_by_noise: Labeled pairs whose chosen answer has the lower gold score.
        num_safety_prompts: Labeled pairs on safety prompts.
        level_counts: Labeled pairs per level label.
        mean_gold_chosen: Mean gold score of the chosen answers (NaN when unknown).
        mean_gold_rejected: Mean gold score of the rejected answers (NaN when unknown).
    """

    num_pairs: int = 0
    num_labeled: int = 0
    skipped_identical: int = 0
    skipped_empty: int = 0
    skipped_unsafe_chosen: int = 0
    equal_scores: int = 0
    flipped_by_noise: int = 0
    num_safety_prompts: int = 0
    level_counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {level.label: 0 for level in PreferenceLevel}
    )
    mean_gold_chosen: float = math.nan
    mean_gold_rejected: float = math.nan

    def count(self, comparison: Comparison) -> None:
        """Add a labeled comparison to the counts."""
        self.num_labeled += 1
        self.num_safety_prompts += comparison.is_safety_prompt
        self.level_counts[comparison.level.label] += 1

    def to_metrics(self, prefix: str = "annotator/") -> dict[str, float]:
        """Return the counts as flat scalars for a metric writer."""
        metrics = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, dict):
                for label, count in value.items():
                    metrics[f"{prefix}level/{label}"] = float(count)
            else:
                metrics[f"{prefix}{field.name}"] = float(value)
        return metrics


class Annotator(abc.ABC):
    """Source of the comparisons for each version of the iterative RLHF loop.

    Attributes:
        kind: The name that selects this annotator in a config.
        needs_samples: Whether `annotate` labels answer pairs sampled from the latest policy.
    """

    kind: ClassVar[str]
    needs_samples: ClassVar[bool]

    @abc.abstractmethod
    def annotate(
        self,
        version: int,
        num_versions: int,
        prompts: Sequence[Prompt] | None = None,
        answers_a: Sequence[str] | None = None,
        answers_b: Sequence[str] | None = None,
    ) -> tuple[list[Comparison], LabelingSummary]:
        """Return the comparisons for one version (0-based) and their counts.

        Annotators with `needs_samples` require one prompt and two answers per pair; the
        others reject samples.
        """


def _check_version(version: int, num_versions: int) -> None:
    if not isinstance(num_versions, int) or num_versions < 1:
        raise ValueError(f"num_versions is {num_versions!r}, expected a positive integer")
    if not isinstance(version, int) or not 0 <= version < num_versions:
        raise ValueError(f"version is {version!r}, expected an integer in [0, {num_versions})")


class SimulatedAnnotator(Annotator):
    """Labels answer pairs with a gold scorer, as a synthetic human annotator.

    The chosen answer is the one with the higher gold score. With `noise` > 0, the annotator
    perceives the gap d = gold(a) - gold(b) as d + e, where e ~ Logistic(0, noise), so it picks
    a with the Bradley-Terry probability sigmoid(d / noise), and rates the strength from the
    perceived gap |d + e| with `level_for_gap`. The noise of a pair is drawn from a generator
    seeded by (seed, the pair's texts), so a pair gets the same label in any batch and in
    either order.

    Args:
        gold_scorer: The judge.
        level_thresholds: Three decreasing gaps, see `level_for_gap`.
        seed: Seed of the noise and of the order of equally scored answers.
        noise: Scale of the logistic noise on the score gap; 0 labels by the gold score.
        drop_unsafe_chosen: Skip pairs where the chosen answer is unsafe and the rejected
            one safe, as Llama 2's safety data excludes them.
        source: The `source` field of the comparisons.
    """

    kind = "simulated"
    needs_samples = True

    def __init__(
        self,
        gold_scorer: GoldScorer,
        level_thresholds: Sequence[float] = DEFAULT_LEVEL_THRESHOLDS,
        seed: int = 0,
        noise: float = 0.0,
        drop_unsafe_chosen: bool = True,
        source: str = "simulated",
    ):
        if not noise >= 0.0:
            raise ValueError(f"noise is {noise!r}, expected a non-negative logistic scale")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed is {seed!r}, expected a non-negative integer")
        self.gold_scorer = gold_scorer
        self.level_thresholds = _check_thresholds(level_thresholds)
        self.seed = seed
        self.noise = float(noise)
        self.drop_unsafe_chosen = drop_unsafe_chosen
        self.source = source

    def _pair_rng(
        self, messages: Sequence[Message], first: str, second: str
    ) -> np.random.Generator:
        payload = json.dumps([[m.role, m.content] for m in messages] + [first, second])
        digest = hashlib.sha256(payload.encode("utf-8")).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    def label(
        self,
        prompt: Prompt,
        answer_a: str,
        answer_b: str,
        summary: LabelingSummary | None = None,
    ) -> Comparison | None:
        """Label one pair; None when the pair is skipped (the reason is counted in `summary`).

        Returns:
            The comparison, or None for identical answers, a blank answer, or (with
            `drop_unsafe_chosen`) an unsafe chosen answer over a safe rejected one.
        """
        summary = LabelingSummary() if summary is None else summary
        return self._label(prompt, answer_a, answer_b, summary)[0]

    def _label(
        self, prompt: Prompt, answer_a: str, answer_b: str, summary: LabelingSummary
    ) -> tuple[Comparison | None, GoldScore | None, GoldScore | None]:
        """Label one pair as `label` does, and also return the chosen and rejected scores."""
        summary.num_pairs += 1
        messages = _as_messages(prompt)
        if not answer_a.strip() or not answer_b.strip():
            summary.skipped_empty += 1
            return None, None, None
        if answer_a.strip() == answer_b.strip():
            summary.skipped_identical += 1
            return None, None, None

        # A canonical order makes the label independent of the order of presentation.
        first, second = sorted((answer_a, answer_b))
        score_first = self.gold_scorer.score(messages, first)
        score_second = self.gold_scorer.score(messages, second)
        rng = self._pair_rng(messages, first, second)
        gap = score_first.gold - score_second.gold
        perceived = gap + (rng.logistic(0.0, self.noise) if self.noise > 0 else 0.0)
        if perceived == 0.0:
            first_wins = bool(rng.integers(2))
        else:
            first_wins = perceived > 0.0
        chosen, rejected = (first, second) if first_wins else (second, first)
        chosen_score, rejected_score = (
            (score_first, score_second) if first_wins else (score_second, score_first)
        )

        if self.drop_unsafe_chosen and not chosen_score.is_safe and rejected_score.is_safe:
            summary.skipped_unsafe_chosen += 1
            return None, chosen_score, rejected_score
        comparison = Comparison(
            context=messages,
            chosen=chosen,
            rejected=rejected,
            level=level_for_gap(abs(perceived), self.level_thresholds),
            is_safety_prompt=score_first.is_safety_prompt,
            chosen_safe=chosen_score.is_safe,
            rejected_safe=rejected_score.is_safe,
            source=self.source,
        )
        summary.count(comparison)
        summary.equal_scores += gap == 0.0
        summary.flipped_by_noise += chosen_score.gold < rejected_score.gold
        return comparison, chosen_score, rejected_score

    def label_pairs(
        self,
        prompts: Sequence[Prompt],
        answers_a: Sequence[str],
        answers_b: Sequence[str],
    ) -> tuple[list[Comparison], LabelingSummary]:
        """Label a batch of pairs, one prompt and two answers each, skipping as `label` does."""
        if not len(prompts) == len(answers_a) == len(answers_b):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(answers_a)} first answers and "
                f"{len(answers_b)} second answers, expected equal counts"
            )
        summary = LabelingSummary()
        comparisons = []
        chosen_gold = []
        rejected_gold = []
        for prompt, answer_a, answer_b in zip(prompts, answers_a, answers_b, strict=True):
            comparison, chosen_score, rejected_score = self._label(
                prompt, answer_a, answer_b, summary
            )
            if comparison is None:
                continue
            comparisons.append(comparison)
            chosen_gold.append(chosen_score.gold)
            rejected_gold.append(rejected_score.gold)
        if comparisons:
            summary.mean_gold_chosen = float(np.mean(chosen_gold))
            summary.mean_gold_rejected = float(np.mean(rejected_gold))
        return comparisons, summary

    def annotate(
        self,
        version: int,
        num_versions: int,
        prompts: Sequence[Prompt] | None = None,
        answers_a: Sequence[str] | None = None,
        answers_b: Sequence[str] | None = None,
    ) -> tuple[list[Comparison], LabelingSummary]:
        """Label the pairs sampled from the policy of this version."""
        _check_version(version, num_versions)
        if prompts is None or answers_a is None or answers_b is None:
            raise ValueError(
                "the simulated annotator labels sampled answers: pass prompts, answers_a and "
                "answers_b"
            )
        return self.label_pairs(prompts, answers_a, answers_b)


class FileAnnotator(Annotator):
    """A static pool of human comparisons, split into one disjoint batch per version.

    The pool is shuffled once with `seed` and cut into `num_versions` parts whose sizes
    differ by at most one. Each batch lists its comparisons in the pool's order.

    Args:
        comparisons: The pool.
        seed: Seed of the split.
        source: Where the pool comes from, for messages.
    """

    kind = "file"
    needs_samples = False

    def __init__(self, comparisons: Sequence[Comparison], seed: int = 0, source: str = "pool"):
        if not comparisons:
            raise ValueError(f"the comparison pool from {source} is empty")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed is {seed!r}, expected a non-negative integer")
        self.comparisons = list(comparisons)
        self.seed = seed
        self.source = source

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        format: str = "jsonl",
        subset: str | None = None,
        skip_invalid: bool = False,
        seed: int = 0,
    ) -> FileAnnotator:
        """Read a pool from the project's JSONL ("jsonl") or HH-RLHF JSONL ("hh_rlhf").

        Args:
            path: The file, gzip-compressed when its name ends with `.gz`.
            format: "jsonl" or "hh_rlhf".
            subset: For "hh_rlhf", the subset the file belongs to, such as "harmless-base".
            skip_invalid: Skip and count bad lines instead of raising.
            seed: Seed of the split across versions.
        """
        summary = ReadSummary()
        if format == "jsonl":
            comparisons = read_comparisons_jsonl(path, skip_invalid=skip_invalid, summary=summary)
        elif format == "hh_rlhf":
            if subset is None:
                raise ValueError(f"reading {path} as HH-RLHF needs its subset, got None")
            comparisons = read_hh_rlhf_jsonl(
                path, subset=subset, skip_invalid=skip_invalid, summary=summary
            )
        else:
            raise ValueError(f"comparison file format is {format!r}, expected 'jsonl' or 'hh_rlhf'")
        log.info("%s", summary)
        return cls(comparisons, seed=seed, source=str(path))

    @classmethod
    def from_tfds(
        cls,
        subset: str,
        split: str,
        data_dir: str | os.PathLike,
        local_dir: str | os.PathLike | None = None,
        skip_invalid: bool = False,
        seed: int = 0,
    ) -> FileAnnotator:
        """Read a pool of HH-RLHF comparisons through the tensorflow-datasets builder.

        Args:
            subset: The HH-RLHF subset, such as "harmless-base".
            split: "train" or "test".
            data_dir: The tensorflow-datasets data directory; the dataset is prepared there
                on first use.
            local_dir: A local copy of the HH-RLHF repository's subset folders. Without it,
                preparing the dataset downloads the files.
            skip_invalid: Skip malformed pairs while preparing.
            seed: Seed of the split across versions.
        """
        # Imported here because tensorflow-datasets takes about a second to import.
        from llama_rlhf.data.tfds_hh_rlhf import load_hh_rlhf

        comparisons = load_hh_rlhf(subset, split, data_dir, local_dir, skip_invalid=skip_invalid)
        return cls(comparisons, seed=seed, source=f"tfds hh-rlhf/{subset}/{split} in {data_dir}")

    def batch_indices(self, version: int, num_versions: int) -> np.ndarray:
        """Return the sorted pool indices of one version's batch."""
        _check_version(version, num_versions)
        if num_versions > len(self.comparisons):
            raise ValueError(
                f"the pool from {self.source} has {len(self.comparisons)} comparisons, too few "
                f"for {num_versions} versions"
            )
        order = np.random.default_rng(self.seed).permutation(len(self.comparisons))
        return np.sort(np.array_split(order, num_versions)[version])

    def batch_for_version(self, version: int, num_versions: int) -> list[Comparison]:
        """Return the comparisons of one version (0-based) out of `num_versions`."""
        return [self.comparisons[i] for i in self.batch_indices(version, num_versions)]

    def annotate(
        self,
        version: int,
        num_versions: int,
        prompts: Sequence[Prompt] | None = None,
        answers_a: Sequence[str] | None = None,
        answers_b: Sequence[str] | None = None,
    ) -> tuple[list[Comparison], LabelingSummary]:
        """Return the pool's batch of this version; sampled answers are not accepted."""
        if prompts is not None or answers_a is not None or answers_b is not None:
            raise ValueError(
                "the file annotator returns stored comparisons and cannot label sampled answers"
            )
        batch = self.batch_for_version(version, num_versions)
        summary = LabelingSummary(num_pairs=len(batch))
        for comparison in batch:
            summary.count(comparison)
        return batch, summary


ANNOTATOR_KINDS: Mapping[str, type[Annotator]] = {
    SimulatedAnnotator.kind: SimulatedAnnotator,
    FileAnnotator.kind: FileAnnotator,
}


def default_annotator_config(kind: str = "simulated") -> ml_collections.ConfigDict:
    """Return the annotator settings with their defaults; `kind` selects the annotator.

    Fields used by "simulated": world_seed and num_animals (the `SyntheticWorld`), seed, noise,
    level_thresholds, drop_unsafe_chosen. Fields used by "file": format, path, subset, split,
    local_dir, skip_invalid, seed. With format "jsonl" or "hh_rlhf", path is the comparison
    file. With "tfds", path is the tensorflow-datasets data directory, and a non-empty
    local_dir is a local copy of HH-RLHF to prepare the dataset from. subset applies to
    "hh_rlhf" and "tfds", split only to "tfds".
    """
    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind is {kind!r}, expected one of {list(ANNOTATOR_KINDS)}")
    config = ml_collections.ConfigDict()
    config.kind = kind
    config.seed = 0
    config.world_seed = 0
    config.num_animals = 8
    config.noise = 0.0
    config.level_thresholds = DEFAULT_LEVEL_THRESHOLDS
    config.drop_unsafe_chosen = True
    config.path = ""
    config.format = "jsonl"
    config.subset = "harmless-base"
    config.split = "train"
    config.local_dir = ""
    config.skip_invalid = False
    return config


def make_annotator(config: Mapping[str, Any], world: SyntheticWorld | None = None) -> Annotator:
    """Build the annotator that `config.kind` names, from the fields of
    `default_annotator_config`.

    Args:
        config: A ConfigDict or mapping with the fields of `default_annotator_config`.
        world: For "simulated", the world the RLHF loop draws prompts from; it must match
            `world_seed` and `num_animals`. Built from them when None.

    Raises:
        ValueError: For an unknown kind, an unknown field, a missing file path, or a world
            that does not match the config.
    """
    fields = dict(config.items())
    known = set(default_annotator_config().keys())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown annotator config field(s) {unknown}; known: {sorted(known)}")
    missing = sorted(known - set(fields))
    if missing:
        raise ValueError(f"annotator config lacks field(s) {missing}")
    kind = fields["kind"]
    if kind == SimulatedAnnotator.kind:
        if world is None:
            world = SyntheticWorld(fields["world_seed"], fields["num_animals"])
        elif (world.seed, world.num_animals) != (fields["world_seed"], fields["num_animals"]):
            raise ValueError(
                f"the annotator config names world_seed={fields['world_seed']} and "
                f"num_animals={fields['num_animals']}, but the RLHF loop's world is {world!r}"
            )
        return SimulatedAnnotator(
            GoldScorer(world),
            level_thresholds=tuple(fields["level_thresholds"]),
            seed=fields["seed"],
            noise=fields["noise"],
            drop_unsafe_chosen=fields["drop_unsafe_chosen"],
        )
    if kind == FileAnnotator.kind:
        if not fields["path"]:
            raise ValueError(
                "the file annotator needs config.path, the comparison file or (for format "
                "'tfds') the tensorflow-datasets data directory"
            )
        if fields["format"] == "tfds":
            return FileAnnotator.from_tfds(
                fields["subset"],
                fields["split"],
                fields["path"],
                local_dir=fields["local_dir"] or None,
                skip_invalid=fields["skip_invalid"],
                seed=fields["seed"],
            )
        return FileAnnotator.from_file(
            fields["path"],
            format=fields["format"],
            subset=fields["subset"] if fields["format"] == "hh_rlhf" else None,
            skip_invalid=fields["skip_invalid"],
            seed=fields["seed"],
        )
    raise ValueError(f"annotator kind is {kind!r}, expected one of {list(ANNOTATOR_KINDS)}")
