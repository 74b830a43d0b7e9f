"""Ghost Attention (GAtt): synthetic fine-tuning data that teaches a chat model to keep following
an instruction given once at the start of a dialogue.

Touvron et al. 2023 ("Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288,
section 3.3 and appendix A.3.5) observed that early Llama 2-Chat forgot a system instruction
after a few turns, and fixed it with the following data construction, which this module
implements:

  1. Instructions. Constraints are drawn from configurable lists: a hobby ("You enjoy
     tennis."), a language ("Speak in French.") or a public figure ("Act as Napoleon."), and
     random combinations of them. This module adds checkable constraints whose following a
     program can measure: capital letters, lower case letters, a fixed last or first word,
     a banned letter, and a language recognized from small word lists (`InstructionChecker`).
  2. Sampling. For each multi-turn dialogue (only its user turns are used), the instruction is
     concatenated in front of every user message, and the answers are sampled turn by turn
     from the latest model, each answer appended before the next turn is sampled.
  3. Rejection with the checker (an addition to the paper, `config.rejection`). Each turn draws
     K samples and keeps the first one that ends with EOS and follows every checkable
     constraint; when none does, the dialogue ends before that turn. The paper samples from an
     RLHF model that already follows an instruction repeated in every turn; a small model
     does not always, and the checker keeps the data clean.
  4. Training data. The instruction stays only in the first turn (in front of the first user
     message, or as a system message), in its short form ("Figure: Napoleon.") half of the
     time, and the loss is zero on every token of earlier turns, assistant answers included,
     because those answers were sampled with an instruction the context no longer shows.
     `config.examples` picks the examples per dialogue: "last" is one example per dialogue
     whose final answer is learned, as the paper describes; "every_turn" is one example per
     turn, each the dialogue up to that turn with its final answer learned, which gives a
     training signal at every distance from the instruction and multiplies a small set of
     dialogues.
  5. Fine-tuning with the SFT stage (`sft.train_on_examples`); the new policy is exported to
     `<workdir>/model`.

Evaluation (`evaluate_following`): dialogues of 2 to 20 turns whose first turn carries one
checkable instruction, answered greedily turn by turn; the result is the fraction of answers
that still follow the instruction at each turn index, as in the paper's Table 30, before and
after GAtt (`report.md`, `following_by_turn.png`).

The tiny CPU variant (`configs/ghost_attention.py:tiny`) starts from a base policy that it
fine-tunes first on dialogues of the synthetic world (`llama_rlhf.data.synthetic`) in which
an instruction may precede any user message and then governs only that turn's answer
(`instruction_sft_dialogues`). That policy follows an instruction while it is in the current
turn and forgets it afterwards, the failure that GAtt addresses.

Resume: the sampled dialogues are written in shards of `sampling.batch_size` dialogues, each
file written atomically, with a manifest of the settings they were drawn with; a rerun
samples only the missing shards and raises an error when the settings changed. The
fine-tuning resumes from its checkpoints, evaluations and the base policy are reused when
their inputs are unchanged, and a finished run returns its summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax
import matplotlib
import ml_collections
import numpy as np
import tqdm

from llama_rlhf import sampling as sampling_lib
from llama_rlhf import sft
from llama_rlhf.data.chat import Message, encode_for_training, encode_prompt
from llama_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from llama_rlhf.rejection_sampling import model_identity, write_json_atomic, write_text_atomic
from llama_rlhf.training.checkpoints import load_initial_params
from llama_rlhf.training.metrics import save_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

SHARDS_DIR = "gatt_samples"
MANIFEST_FILE = "manifest.json"
DATA_FILE = "gatt_data.jsonl"
FINETUNE_DIR = "finetune"
MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
BASE_POLICY_DIR = "base_policy"
EVAL_BEFORE_FILE = "eval_before.json"
EVAL_AFTER_FILE = "eval_after.json"
REPORT_FILE = "report.md"
PLOT_FILE = "following_by_turn.png"
# Incremented whenever the fields of the evaluation files change, so older files are recomputed.
EVAL_FORMAT_VERSION = 2

EXAMPLE_MODES = ("last", "every_turn")
# Separate random streams, mixed with the seed, for the training instructions, the evaluation
# instructions and the base policy's dialogues.
_STREAM_TRAINING = 7
_STREAM_EVALUATION = 11
_STREAM_BASE_POLICY = 13
PLACEMENTS = ("first_user", "system")


# ---------------------------------------------------------------------------------------------
# Instructions.

CONSTRAINT_KINDS = (
    "hobby", "language", "figure", "capitals", "lower_case", "ends_with", "starts_with",
    "avoid_letter",
)  # fmt: skip
# Kind -> (verbose template, short template). The verbose form is concatenated to every user
# message while sampling. The training data uses the short form half of the time, as Llama 2
# shortened "Always act as Napoleon from now" to "Figure: Napoleon.".
_TEMPLATES: Mapping[str, tuple[str, str]] = {
    "hobby": ("You enjoy {value}.", "Hobby: {value}."),
    "language": ("Speak in {value}.", "Language: {value}."),
    "figure": ("Act as {value}.", "Figure: {value}."),
    "capitals": ("Always answer in capital letters.", "Format: capital letters."),
    "lower_case": ("Always answer in lower case letters.", "Format: lower case letters."),
    "ends_with": ("Always end your answer with the word {value}.", "Last word: {value}."),
    "starts_with": ("Always start your answer with the word {value}.", "First word: {value}."),
    "avoid_letter": ("Never use the letter {value}.", "Banned letter: {value}."),
}
# The config list (`config.instructions.<field>`) with the values of each kind that takes one.
VALUE_FIELDS: Mapping[str, str] = {
    "hobby": "hobbies",
    "language": "languages",
    "figure": "figures",
    "ends_with": "end_words",
    "starts_with": "start_words",
    "avoid_letter": "avoided_letters",
}
# A combination contains at most one constraint per group, so it never contradicts itself.
_GROUPS: Mapping[str, str] = {"capitals": "case", "lower_case": "case"}
# Kinds that a program can always check; "language" is checkable when word lists are given.
ALWAYS_CHECKABLE = ("capitals", "lower_case", "ends_with", "starts_with", "avoid_letter")
# Kinds that `rewrite_to_follow` can impose on any answer, and kinds that put no constraint
# on the answer's form.
REWRITABLE = ("capitals", "lower_case", "ends_with", "starts_with")
FREE_FORM = ("hobby", "figure")

DEFAULT_HOBBIES = (
    "tennis", "chess", "gardening", "painting", "hiking", "cooking", "photography",
    "knitting", "surfing", "birdwatching",
)  # fmt: skip
DEFAULT_LANGUAGES = ("French", "Spanish", "German", "Italian")
DEFAULT_FIGURES = (
    "Napoleon", "Cleopatra", "Albert Einstein", "Marie Curie", "William Shakespeare",
    "Ada Lovelace", "Abraham Lincoln", "Leonardo da Vinci",
)  # fmt: skip
# Frequent function words per language, enough to tell the languages apart in a sentence.
DEFAULT_LANGUAGE_WORDS: Mapping[str, tuple[str, ...]] = {
    "English": (
        "the", "a", "an", "and", "is", "are", "of", "to", "in", "it", "you", "i", "that", "this",
        "with", "for", "on", "was", "have", "not",
    ),
    "French": (
        "le", "la", "les", "un", "une", "et", "est", "sont", "de", "des", "du", "je", "vous",
        "il", "elle", "nous", "que", "qui", "pas", "avec", "pour", "dans", "ce", "sur",
    ),
    "Spanish": (
        "el", "los", "las", "un", "una", "y", "es", "son", "del", "yo", "usted", "que", "con",
        "para", "en", "por", "muy", "pero", "este", "esta", "como", "su",
    ),
    "German": (
        "der", "die", "das", "ein", "eine", "und", "ist", "sind", "von", "zu", "ich", "sie",
        "wir", "nicht", "mit", "für", "auf", "den", "dem", "auch", "es",
    ),
    "Italian": (
        "il", "lo", "gli", "uno", "e", "è", "sono", "di", "che", "non", "con", "per",
        "io", "lei", "noi", "della", "nel", "questo", "anche", "ma",
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One part of an instruction.

    Attributes:
        kind: One of `CONSTRAINT_KINDS`.
        value: The hobby, language, figure, word or letter; empty for "capitals" and
            "lower_case".
    """

    kind: str
    value: str = ""

    def __post_init__(self):
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind is {self.kind!r}, expected one of "
                             f"{CONSTRAINT_KINDS}")
        if not isinstance(self.value, str):
            raise ValueError(f"{self.kind} constraint value is a {type(self.value).__name__}, "
                             "expected str")
        if self.kind in VALUE_FIELDS and not self.value.strip():
            raise ValueError(f"a {self.kind} constraint needs a value")
        if self.kind not in VALUE_FIELDS and self.value:
            raise ValueError(f"a {self.kind} constraint takes no value, got {self.value!r}")
        if self.kind == "avoid_letter" and not (len(self.value) == 1 and self.value.isalpha()):
            raise ValueError(f"an avoid_letter value must be one letter, got {self.value!r}")
        if self.kind in ("ends_with", "starts_with") and not letter_words(self.value):
            raise ValueError(f"a {self.kind} value must contain a word, got {self.value!r}")

    def text(self, short: bool = False) -> str:
        """Return the constraint as an instruction sentence, verbose or short."""
        verbose, short_template = _TEMPLATES[self.kind]
        template = short_template if short else verbose
        if self.kind in ("ends_with", "starts_with") and len(letter_words(self.value)) > 1:
            template = template.replace("the word {value}", "the words {value}")
        return template.format(value=self.value)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """A combination of constraints that the answers of a whole dialogue must follow.

    Attributes:
        constraints: The constraints, in the order their sentences are written.
    """

    constraints: tuple[Constraint, ...]

    def __post_init__(self):
        if not self.constraints:
            raise ValueError("an instruction needs at least one constraint")
        groups = [_GROUPS.get(c.kind, c.kind) for c in self.constraints]
        if len(set(groups)) < len(groups):
            raise ValueError(f"the constraints {self.constraints} contain two of the same group "
                             "(kind, or capital and lower case letters)")

    def text(self, short: bool = False) -> str:
        """Return the instruction's sentences joined by spaces."""
        return " ".join(constraint.text(short) for constraint in self.constraints)

    def to_json(self) -> list[dict[str, str]]:
        return [{"kind": c.kind, "value": c.value} for c in self.constraints]

    @classmethod
    def from_json(cls, record: Any) -> Instruction:
        """Read the output of `to_json`.

        Raises:
            ValueError: If `record` is not a list of {"kind", "value"} objects.
        """
        if not isinstance(record, list) or not all(
                isinstance(item, dict) and set(item) == {"kind", "value"} for item in record):
            raise ValueError(f"instruction is {record!r}, expected a list of objects with the "
                             "keys 'kind' and 'value'")
        return cls(tuple(Constraint(item["kind"], item["value"]) for item in record))


@dataclasses.dataclass(frozen=True)
class InstructionSpace:
    """The instructions to draw from: weighted kinds, their values and the combination size.

    Attributes:
        kind_weights: Kind -> sampling weight; kinds of weight 0 are never drawn.
        values: Kind -> its values, for every kind of `VALUE_FIELDS` with a positive weight.
        max_constraints: An instruction combines 1 to `max_constraints` constraints, the
            number drawn uniformly.
        shorten_probability: The probability that the training data writes the instruction
            in its short form.
    """

    kind_weights: Mapping[str, float]
    values: Mapping[str, tuple[str, ...]]
    max_constraints: int = 1
    shorten_probability: float = 0.5

    def __post_init__(self):
        unknown = sorted(set(self.kind_weights) - set(CONSTRAINT_KINDS))
        if unknown:
            raise ValueError(f"kind_weights has unknown kinds {unknown}, expected kinds of "
                             f"{CONSTRAINT_KINDS}")
        weights = np.array(list(self.kind_weights.values()), np.float64)
        if weights.size == 0 or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"kind_weights is {dict(self.kind_weights)}, expected non-negative "
                             "weights, not all 0")
        for kind, weight in self.kind_weights.items():
            if weight > 0 and kind in VALUE_FIELDS and not self.values.get(kind):
                raise ValueError(f"the kind {kind!r} has weight {weight} but no values; set "
                                 f"instructions.{VALUE_FIELDS[kind]}")
            for value in self.values.get(kind, ()):
                Constraint(kind, value)  # Raises on an invalid value.
        if not isinstance(self.max_constraints, int) or self.max_constraints < 1:
            raise ValueError(f"max_constraints is {self.max_constraints!r}, expected an integer "
                             ">= 1")
        if not 0.0 <= self.shorten_probability <= 1.0:
            raise ValueError(f"shorten_probability is {self.shorten_probability}, expected a "
                             "probability in [0, 1]")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict,
                    kind_weights: Mapping[str, float] | None = None) -> InstructionSpace:
        """Build the space of `config.instructions` (see configs/ghost_attention.py), with
        other kind weights when `kind_weights` is given."""
        values = {kind: tuple(str(v) for v in config[field])
                  for kind, field in VALUE_FIELDS.items()}
        weights = config.kind_weights if kind_weights is None else kind_weights
        return cls(kind_weights={k: float(w) for k, w in weights.items()},
                   values=values, max_constraints=int(config.max_constraints),
                   shorten_probability=float(config.shorten_probability))

    def draw(self, rng: np.random.Generator, kinds: Collection[str] | None = None
             ) -> Instruction:
        """Draw an instruction: a number of constraints, then distinct kinds by weight, then a
        value of each kind uniformly.

        Args:
            rng: The random source.
            kinds: Draw only from these kinds (those of them with a positive weight).

        Raises:
            ValueError: If `kinds` leaves no kind with a positive weight.
        """
        available = {kind: weight for kind, weight in self.kind_weights.items()
                     if weight > 0 and (kinds is None or kind in kinds)}
        if not available:
            raise ValueError(f"no kind of {sorted(kinds or ())} has a positive weight in "
                             f"{dict(self.kind_weights)}")
        count = int(rng.integers(1, self.max_constraints + 1))
        constraints = []
        for _ in range(count):
            names = sorted(available)
            if not names:
                break
            weights = np.array([available[name] for name in names])
            kind = names[rng.choice(len(names), p=weights / weights.sum())]
            group = _GROUPS.get(kind, kind)
            available = {k: w for k, w in available.items() if _GROUPS.get(k, k) != group}
            value = ""
            if kind in VALUE_FIELDS:
                choices = self.values[kind]
                value = choices[rng.integers(len(choices))]
            constraints.append(Constraint(kind, value))
        return Instruction(tuple(constraints))

    def draw_short(self, rng: np.random.Generator) -> bool:
        """Draw whether the training data writes an instruction in its short form."""
        return bool(rng.random() < self.shorten_probability)


# ---------------------------------------------------------------------------------------------
# Checkers: pure functions of the answer text.

_LETTER_WORD = re.compile(r"[^\W\d_]+")


def letter_words(text: str) -> list[str]:
    """Split text into lowercase words of letters (any alphabet); digits and punctuation split
    words and are dropped."""
    return _LETTER_WORD.findall(text.lower())


def _letters(text: str) -> list[str]:
    return [character for character in text if character.isalpha()]


def is_capitalized(answer: str) -> bool:
    """Return whether the answer has letters and none of them is lower case."""
    letters = _letters(answer)
    return bool(letters) and not any(letter.islower() for letter in letters)


def is_lower_case(answer: str) -> bool:
    """Return whether the answer has letters and none of them is upper case."""
    letters = _letters(answer)
    return bool(letters) and not any(letter.isupper() for letter in letters)


def ends_with_words(answer: str, phrase: str) -> bool:
    """Return whether the answer's last words are the phrase's words, ignoring case and
    punctuation ("..., friend." ends with "friend")."""
    expected = letter_words(phrase)
    words = letter_words(answer)
    return bool(expected) and words[-len(expected):] == expected


def starts_with_words(answer: str, phrase: str) -> bool:
    """Return whether the answer's first words are the phrase's words, ignoring case and
    punctuation."""
    expected = letter_words(phrase)
    words = letter_words(answer)
    return bool(expected) and words[:len(expected)] == expected


def avoids_letter(answer: str, letter: str) -> bool:
    """Return whether the answer has letters and none of them is `letter` in either case."""
    return bool(_letters(answer)) and letter.lower() not in answer.lower()


def language_fractions(answer: str, word_lists: Mapping[str, Collection[str]]
                       ) -> dict[str, float]:
    """Return, per language, the fraction of the answer's words that are in its word list
    (0 for an answer without words)."""
    words = letter_words(answer)
    fractions = {}
    for language, vocabulary in word_lists.items():
        known = {word.lower() for word in vocabulary}
        fractions[language] = (sum(word in known for word in words) / len(words)) if words else 0.0
    return fractions


def is_in_language(answer: str, language: str, word_lists: Mapping[str, Collection[str]],
                   min_fraction: float = 0.2) -> bool:
    """Return whether the answer is written in `language`.

    It is when at least `min_fraction` of its words are in the language's word list and that
    fraction is higher than the fraction of every other listed language.

    Raises:
        KeyError: If `language` has no word list.
    """
    if language not in word_lists:
        raise KeyError(f"no word list for the language {language!r}; word lists exist for "
                       f"{sorted(word_lists)}")
    fractions = language_fractions(answer, word_lists)
    target = fractions.pop(language)
    return target >= min_fraction and all(target > other for other in fractions.values())


class InstructionChecker:
    """Decides whether an answer follows the checkable constraints of an instruction.

    Args:
        language_words: Language -> frequent words, for checking "language" constraints. A
            language constraint is checkable when its language has a list and at least one
            other language has one too (an answer is attributed to the best-matching list).
        min_language_fraction: See `is_in_language`.
    """

    def __init__(self, language_words: Mapping[str, Collection[str]] | None = None,
                 min_language_fraction: float = 0.2):
        words = DEFAULT_LANGUAGE_WORDS if language_words is None else language_words
        self.language_words = {language: tuple(w.lower() for w in vocabulary)
                               for language, vocabulary in words.items()}
        if not 0.0 < min_language_fraction <= 1.0:
            raise ValueError(f"min_language_fraction is {min_language_fraction}, expected a "
                             "fraction in (0, 1]")
        self.min_language_fraction = min_language_fraction

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> InstructionChecker:
        """Build the checker of `config.instructions`."""
        words = {language: tuple(str(w) for w in vocabulary)
                 for language, vocabulary in config.language_words.items()}
        return cls(words, float(config.min_language_fraction))

    def is_checkable(self, constraint: Constraint) -> bool:
        """Return whether a program can tell if an answer follows the constraint."""
        if constraint.kind in ALWAYS_CHECKABLE:
            return True
        if constraint.kind == "language":
            return constraint.value in self.language_words and len(self.language_words) > 1
        return False

    def follows(self, constraint: Constraint, answer: str) -> bool:
        """Return whether the answer follows one checkable constraint.

        Raises:
            ValueError: If the constraint is not checkable (see `is_checkable`).
        """
        if not self.is_checkable(constraint):
            raise ValueError(f"the constraint {constraint} cannot be checked by a program")
        kind, value = constraint.kind, constraint.value
        if kind == "capitals":
            return is_capitalized(answer)
        if kind == "lower_case":
            return is_lower_case(answer)
        if kind == "ends_with":
            return ends_with_words(answer, value)
        if kind == "starts_with":
            return starts_with_words(answer, value)
        if kind == "avoid_letter":
            return avoids_letter(answer, value)
        return is_in_language(answer, value, self.language_words, self.min_language_fraction)

    def checkable_constraints(self, instruction: Instruction) -> list[Constraint]:
        return [c for c in instruction.constraints if self.is_checkable(c)]

    def follows_instruction(self, instruction: Instruction, answer: str) -> bool | None:
        """Return whether the answer follows every checkable constraint of the instruction,
        or None when the instruction has no checkable constraint."""
        checkable = self.checkable_constraints(instruction)
        if not checkable:
            return None
        return all(self.follows(constraint, answer) for constraint in checkable)


def rewrite_to_follow(instruction: Instruction, answer: str) -> str | None:
    """Rewrite an answer so that it follows the instruction, or return None when a constraint
    has no rewriting rule ("avoid_letter", "language").

    Hobby and figure constraints leave the answer as it is. A first or last word is added
    ("Well, the fox ..." and "..., friend."), then the letter case is changed, so that
    "capitals" also applies to the added words.
    """
    text = answer.strip()
    for constraint in instruction.constraints:
        if constraint.kind in FREE_FORM or constraint.kind in ("capitals", "lower_case"):
            continue
        if constraint.kind == "ends_with":
            text = f"{text.rstrip('.!?').rstrip()}, {constraint.value}."
        elif constraint.kind == "starts_with":
            keep_capital = text.startswith(("I ", "I'"))
            rest = text if keep_capital else text[:1].lower() + text[1:]
            text = f"{constraint.value[:1].upper()}{constraint.value[1:]}, {rest}"
        else:
            return None
    kinds = {constraint.kind for constraint in instruction.constraints}
    if "capitals" in kinds:
        text = text.upper()
    elif "lower_case" in kinds:
        text = text.lower()
    return text


# ---------------------------------------------------------------------------------------------
# Dialogues with an instruction.


def instructed_messages(user_turns: Sequence[str], answers: Sequence[str], instruction_text: str,
                        *, every_turn: bool, placement: str = "first_user") -> list[Message]:
    """Build a dialogue with the instruction in its first turn or in every user turn.

    Args:
        user_turns: The user messages, without instruction.
        answers: The assistant answers, as many as `user_turns` or one fewer (the dialogue
            then ends with a user message, a prompt to sample from).
        instruction_text: The instruction.
        every_turn: Concatenate the instruction in front of every user message (GAtt's
            sampling); otherwise only the first turn carries it (GAtt's training data).
        placement: Where the first turn carries it when not `every_turn`: "first_user" in
            front of the first user message, "system" as a system message, which Llama 2's
            chat format merges into the first user message between <<SYS>> tags.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement is {placement!r}, expected one of {PLACEMENTS}")
    if not user_turns or len(answers) not in (len(user_turns), len(user_turns) - 1):
        raise ValueError(f"a dialogue of {len(user_turns)} user turns needs "
                         f"{len(user_turns)} or {len(user_turns) - 1} answers, got {len(answers)}")
    messages = []
    if placement == "system" and not every_turn:
        messages.append(Message("system", instruction_text))
    for turn, user_text in enumerate(user_turns):
        carries = every_turn or (turn == 0 and placement == "first_user")
        content = f"{instruction_text} {user_text}" if carries else user_text
        messages.append(Message("user", content))
        if turn < len(answers):
            messages.append(Message("assistant", answers[turn]))
    return messages


@dataclasses.dataclass(frozen=True)
class GattDialogue:
    """A dialogue of GAtt's training data.

    Attributes:
        instruction: The instruction the answers were sampled with.
        instruction_text: Its text in the training data (verbose or short form).
        user_turns: The user messages without the instruction.
        answers: One sampled answer per user turn.
        source_index: The index of the input dialogue it came from.
    """

    instruction: Instruction
    instruction_text: str
    user_turns: tuple[str, ...]
    answers: tuple[str, ...]
    source_index: int

    def messages(self, placement: str = "first_user") -> list[Message]:
        """Return the training dialogue, with the instruction in the first turn only."""
        return instructed_messages(self.user_turns, self.answers, self.instruction_text,
                                   every_turn=False, placement=placement)

    def to_json(self, placement: str = "first_user") -> dict[str, Any]:
        record = sft.dialogue_to_json(self.messages(placement))
        record.update(instruction=self.instruction.to_json(),
                      instruction_text=self.instruction_text,
                      user_turns=list(self.user_turns), answers=list(self.answers),
                      source_index=self.source_index)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> GattDialogue:
        return cls(Instruction.from_json(record["instruction"]), str(record["instruction_text"]),
                   tuple(record["user_turns"]), tuple(record["answers"]),
                   int(record["source_index"]))


def gatt_examples(tokenizer: Tokenizer, dialogue: GattDialogue, *, mode: str = "last",
                  placement: str = "first_user") -> list[tuple[list[int], list[int]]]:
    """Encode a GAtt dialogue as training examples whose loss covers only a final answer.

    Every token of the earlier turns, the instruction and the earlier answers included, has
    loss mask 0.

    Args:
        tokenizer: The policy's tokenizer.
        dialogue: The dialogue.
        mode: "last": one example, the whole dialogue with its last answer learned.
            "every_turn": one example per turn k, the dialogue up to turn k with answer k
            learned.
        placement: See `instructed_messages`.

    Returns:
        (ids, loss_mask) pairs, as `chat.encode_for_training` returns them.
    """
    if mode not in EXAMPLE_MODES:
        raise ValueError(f"examples mode is {mode!r}, expected one of {EXAMPLE_MODES}")
    messages = dialogue.messages(placement)
    offset = 1 if placement == "system" else 0
    ends = [len(messages)] if mode == "last" else [
        offset + 2 * turns for turns in range(1, len(dialogue.answers) + 1)]
    return [encode_for_training(tokenizer, messages[:end], learn="last") for end in ends]


def user_turns_of(dialogue: Any) -> list[str]:
    """Return the user messages of a dialogue: a sequence of `chat.Message`, or an object with
    a `messages` attribute such as a synthetic `MultiTurnDialogue`. System messages and
    assistant answers are dropped; GAtt samples every answer anew."""
    messages = getattr(dialogue, "messages", dialogue)
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Message):
            raise TypeError(f"dialogue message {index} is a {type(message).__name__}, expected "
                            "chat.Message")
        if message.role == "user":
            turns.append(message.content)
    if not turns:
        raise ValueError("a dialogue has no user message")
    return turns


# ---------------------------------------------------------------------------------------------
# Turn-by-turn generation.


@dataclasses.dataclass
class GeneratedDialogue:
    """The answers generated for one dialogue.

    Attributes:
        answers: The kept answer of each turn that was generated.
        finished: Whether each kept answer ended with EOS.
        stop_reason: "complete" when every user turn was answered, "too_long" when the next
            prompt did not fit, "rejected" when `select` rejected every sample of a turn.
    """

    answers: list[str]
    finished: list[bool]
    stop_reason: str = "complete"


# select(dialogue index, turn, candidate answers, finished flags) -> candidate index or None.
SelectFn = Callable[[int, int, Sequence[str], Sequence[bool]], int | None]


def _keep_first(index: int, turn: int, answers: Sequence[str], finished: Sequence[bool]) -> int:
    del index, turn, answers, finished
    return 0


def generate_dialogues(
    sampler: sampling_lib.Sampler,
    tokenizer: Tokenizer,
    user_turns: Sequence[Sequence[str]],
    instruction_texts: Sequence[str],
    rng: jax.Array,
    *,
    every_turn: bool,
    placement: str = "first_user",
    batch_size: int,
    max_prompt_length: int,
    params: Any = None,
    select: SelectFn = _keep_first,
    progress: str | None = None,
) -> list[GeneratedDialogue]:
    """Answer dialogues turn by turn, each answer appended before the next turn is sampled.

    At each turn the prompts of the dialogues still going are encoded in the chat format and
    sampled in batches of exactly `batch_size` rows, so every call has the same batch shape. A
    short batch is filled with copies of its first prompt, whose answers are discarded.
    The key of turn t and batch b is fold_in(fold_in(rng, t), b).

    Args:
        sampler: The policy's sampler; its `num_samples` candidates are drawn per turn.
        tokenizer: The policy's tokenizer.
        user_turns: Per dialogue, its user messages without instruction.
        instruction_texts: Per dialogue, its instruction.
        rng: The random key.
        every_turn, placement: Where the instruction goes (see `instructed_messages`).
        batch_size: Dialogues per sampler call.
        max_prompt_length: A dialogue stops ("too_long") when its next prompt is longer, or
            when the prompt and `max_new_tokens` do not fit the model.
        params: Parameters for the sampler, overriding those it was built with.
        select: Picks the candidate to keep; None stops the dialogue ("rejected").
        progress: The label of a progress bar over turns, or None for no bar.
    """
    if len(user_turns) != len(instruction_texts):
        raise ValueError(f"{len(user_turns)} dialogues but {len(instruction_texts)} "
                         "instructions")
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected a positive integer")
    results = [GeneratedDialogue([], []) for _ in user_turns]
    active = [i for i, turns in enumerate(user_turns) if turns]
    max_new = sampler.sampling.max_new_tokens
    limit = min(max_prompt_length, sampler.model_config.max_seq_len - max_new)
    eos_id = tokenizer.eos_id
    num_turns = max((len(turns) for turns in user_turns), default=0)
    for turn in tqdm.trange(num_turns, desc=progress, disable=True if progress is None else None,
                            leave=False):
        prompts = {}
        for index in active:
            messages = instructed_messages(user_turns[index][:turn + 1], results[index].answers,
                                           instruction_texts[index], every_turn=every_turn,
                                           placement=placement)
            ids = encode_prompt(tokenizer, messages)
            if len(ids) > limit:
                results[index].stop_reason = "too_long"
            else:
                prompts[index] = ids
        indices = list(prompts)
        turn_key = jax.random.fold_in(rng, turn)
        for batch_index, start in enumerate(range(0, len(indices), batch_size)):
            chunk = indices[start:start + batch_size]
            batch = [prompts[i] for i in chunk]
            batch += [batch[0]] * (batch_size - len(batch))
            samples = sampler.generate_ids(batch, jax.random.fold_in(turn_key, batch_index),
                                           params=params)
            for index, candidates in zip(chunk, samples, strict=False):
                finished = [bool(ids) and ids[-1] == eos_id for ids in candidates]
                texts = [tokenizer.decode(ids[:-1] if done else ids).strip()
                         for ids, done in zip(candidates, finished, strict=True)]
                choice = select(index, turn, texts, finished)
                if choice is None:
                    results[index].stop_reason = "rejected"
                    continue
                results[index].answers.append(texts[choice])
                results[index].finished.append(finished[choice])
        active = [i for i in indices if results[i].stop_reason == "complete"
                  and len(user_turns[i]) > turn + 1]
    return results


# ---------------------------------------------------------------------------------------------
# Data construction.


def make_sampler(model_config, sampling_config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 *, greedy: bool, mesh=None, max_new_tokens: int | None = None,
                 ) -> sampling_lib.Sampler:
    """Build a sampler for the policy shape; parameters are passed to each call."""
    settings = sampling_lib.SamplingConfig(
        temperature=0.0 if greedy else float(sampling_config.temperature),
        top_k=None if greedy else (int(sampling_config.top_k) or None),
        top_p=1.0 if greedy else float(sampling_config.top_p),
        max_new_tokens=int(max_new_tokens or sampling_config.max_new_tokens),
        num_samples=1 if greedy else int(sampling_config.num_samples))
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the policy has {model_config.vocab_size} token ids, fewer than the "
                         f"tokenizer {tokenizer.source} ({tokenizer.vocab_size})")
    return sampling_lib.Sampler(model_config, None, settings, tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, mesh=mesh)


def _select_following(checker: InstructionChecker, instructions: Sequence[Instruction],
                      require_eos: bool, use_checker: bool) -> SelectFn:
    """Keep the first candidate that is non-empty, ends with EOS (when required) and follows
    the checkable constraints (when `use_checker`)."""

    def select(index, turn, answers, finished):
        del turn
        for candidate, (answer, done) in enumerate(zip(answers, finished, strict=True)):
            if not answer or (require_eos and not done):
                continue
            if use_checker and checker.follows_instruction(instructions[index], answer) is False:
                continue
            return candidate
        return None

    return select


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _config_json(config: ml_collections.ConfigDict) -> Any:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def build_gatt_data(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    *,
    policy_init: str,
    tokenizer: Tokenizer,
    dialogues: Sequence[Any],
) -> tuple[list[GattDialogue], dict[str, Any]]:
    """Sample GAtt's training dialogues (steps 1 to 4 of the module docstring), resumably.

    Returns:
        The dialogues with at least one kept turn, and statistics of the construction.
    """
    space = InstructionSpace.from_config(config.instructions)
    checker = InstructionChecker.from_config(config.instructions)
    user_turns = [user_turns_of(dialogue) for dialogue in dialogues]
    max_turns = int(config.data.max_turns)
    if max_turns:
        user_turns = [turns[:max_turns] for turns in user_turns]
    if not user_turns:
        raise ValueError("no dialogues given; GAtt needs at least one")

    # The instructions and their training form are a function of the seed alone.
    rng = np.random.default_rng([int(config.seed), _STREAM_TRAINING])
    instructions, training_texts = [], []
    for _ in user_turns:
        instruction = space.draw(rng)
        instructions.append(instruction)
        training_texts.append(instruction.text(short=space.draw_short(rng)))

    shard_size = int(config.sampling.batch_size)
    manifest = {
        "policy": model_identity(policy_init),
        "tokenizer": str(tokenizer.source),
        "dialogues": _fingerprint(user_turns),
        "seed": int(config.seed),
        "instructions": _config_json(config.instructions),
        "sampling": _config_json(config.sampling),
        "rejection": _config_json(config.rejection),
        "data": _config_json(config.data),
    }
    shards_dir = workdir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = shards_dir / MANIFEST_FILE
    if manifest_path.is_file():
        stored = json.loads(manifest_path.read_text())
        if stored != json.loads(json.dumps(manifest)):
            changed = sorted(k for k in manifest if stored.get(k) != manifest[k])
            raise ValueError(f"{shards_dir} contains GAtt samples drawn with other settings "
                             f"(changed: {changed}); use a new workdir or delete {shards_dir}")
    else:
        write_json_atomic(manifest_path, manifest)

    sampler = None
    params = None
    num_shards = -(-len(user_turns) // shard_size)
    select = _select_following(checker, instructions, bool(config.rejection.require_eos),
                               bool(config.rejection.use_checker))
    shards = []
    for shard in range(num_shards):
        path = shards_dir / f"shard_{shard:05d}.json"
        if path.is_file():
            shards.append(json.loads(path.read_text()))
            continue
        if sampler is None:
            mesh = sft.create_mesh_from_config(config)
            policy = load_initial_params(policy_init, head="lm",
                                         rng=jax.random.key(int(config.seed)), mesh=mesh)
            params = policy.params
            sampler = make_sampler(policy.config, config.sampling, tokenizer, greedy=False,
                                   mesh=mesh)
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, len(user_turns))))
        start = time.perf_counter()
        generated = generate_dialogues(
            sampler, tokenizer, [user_turns[i] for i in indices],
            [instructions[i].text() for i in indices],
            jax.random.fold_in(jax.random.key(int(config.seed)), shard), every_turn=True,
            batch_size=shard_size, max_prompt_length=int(config.sampling.max_prompt_length),
            params=params, select=lambda i, t, a, f, base=indices[0]: select(base + i, t, a, f),
            progress=f"GAtt shard {shard + 1}/{num_shards}")
        record = [{"index": i, "answers": g.answers, "finished": g.finished,
                   "stop_reason": g.stop_reason, "num_user_turns": len(user_turns[i])}
                  for i, g in zip(indices, generated, strict=True)]
        write_json_atomic(path, record)
        logger.info("GAtt shard %d/%d: %d dialogues in %.1f s.", shard + 1, num_shards,
                    len(indices), time.perf_counter() - start)
        shards.append(record)

    result, stop_reasons = [], {"complete": 0, "too_long": 0, "rejected": 0}
    kept_turns = total_turns = 0
    for record in (item for shard in shards for item in shard):
        index = record["index"]
        stop_reasons[record["stop_reason"]] += 1
        total_turns += record["num_user_turns"]
        kept_turns += len(record["answers"])
        if record["answers"]:
            result.append(GattDialogue(
                instructions[index], training_texts[index],
                tuple(user_turns[index][:len(record["answers"])]), tuple(record["answers"]),
                index))
    statistics = {
        "input_dialogues": len(user_turns),
        "kept_dialogues": len(result),
        "input_turns": total_turns,
        "kept_turns": kept_turns,
        "kept_turn_fraction": kept_turns / max(total_turns, 1),
        "stop_reasons": stop_reasons,
        "short_instruction_fraction": float(np.mean(
            [d.instruction_text == d.instruction.text(short=True) for d in result])
        ) if result else 0.0,
    }
    return result, statistics


def run_ghost_attention(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    policy_init: str | os.PathLike,
    tokenizer: Tokenizer,
    dialogues: Sequence[Any],
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build GAtt data from `dialogues` with `policy_init` and fine-tune `policy_init` on it.

    Rerunning with the same arguments and workdir resumes; a finished run returns its summary.

    Args:
        config: A `configs/ghost_attention.py` config.
        workdir: The run's folder; the new policy is exported to `<workdir>/model`.
        policy_init: The latest policy, which samples the answers and is fine-tuned (anything
            `load_initial_params` accepts).
        tokenizer: The policy's tokenizer.
        dialogues: Multi-turn dialogues (see `user_turns_of`); their user messages are used.
        on_step: Test hook called after each fine-tuning step.

    Returns:
        The data statistics, the fine-tuning metrics and the paths of the data file and the
        exported model (also written to `<workdir>/summary.json`).
    """
    start = time.perf_counter()
    _check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    save_config(workdir, config)
    policy_init = str(policy_init)
    summary_path = workdir / SUMMARY_FILE
    fingerprint = _fingerprint({
        "policy": model_identity(policy_init),
        "dialogues": [user_turns_of(d) for d in dialogues],
        "config": {key: _config_json(config[key]) for key in
                   ("instructions", "sampling", "rejection", "data", "finetune")},
        "examples": config.examples, "placement": config.placement, "seed": int(config.seed),
    })
    if summary_path.is_file() and (workdir / MODEL_DIR).is_dir():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            logger.info("GAtt in %s has already finished; returning its summary.", workdir)
            return summary

    gatt_dialogues, statistics = build_gatt_data(config, workdir, policy_init=policy_init,
                                                 tokenizer=tokenizer, dialogues=dialogues)
    logger.info("GAtt data: kept %d of %d dialogues and %d of %d turns (%s).",
                statistics["kept_dialogues"], statistics["input_dialogues"],
                statistics["kept_turns"], statistics["input_turns"], statistics["stop_reasons"])
    if not gatt_dialogues:
        raise ValueError("no GAtt dialogue kept a single turn: the policy's samples never "
                         "followed the instruction. Raise sampling.num_samples or turn off "
                         "rejection.use_checker.")
    data_path = workdir / DATA_FILE
    lines = [json.dumps(d.to_json(config.placement), ensure_ascii=False) for d in gatt_dialogues]
    write_text_atomic(data_path, "\n".join(lines) + "\n")

    examples = [example for d in gatt_dialogues for example in
                gatt_examples(tokenizer, d, mode=config.examples, placement=config.placement)]
    # Truncation would cut the learned answer, which ends each example, so long examples go.
    max_length = int(config.finetune.data.max_length)
    fitting = [example for example in examples if len(example[0]) <= max_length]
    if len(fitting) < len(examples):
        logger.warning("Dropped %d of %d GAtt examples longer than finetune.data.max_length "
                       "(%d tokens).", len(examples) - len(fitting), len(examples), max_length)
    statistics.update(examples=len(fitting), examples_too_long=len(examples) - len(fitting))
    examples = fitting
    finetune_config = config.finetune.copy_and_resolve_references()
    finetune_config.data.tokenizer = str(tokenizer.source)
    result = sft.train_on_examples(
        finetune_config, workdir / FINETUNE_DIR, examples, init_from=policy_init,
        tokenizer=tokenizer, on_step=on_step,
        metadata={"stage": "ghost_attention", "policy_init": policy_init,
                  "gatt_dialogues": len(gatt_dialogues), "gatt_examples": len(examples)})

    # A rename, not a second export: the SFT stage has just written a complete model folder.
    model_dir = workdir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(result.model_dir, model_dir)
    summary = {
        "fingerprint": fingerprint,
        "data": statistics,
        "finetune": {"metrics": dict(result.metrics), "steps": int(result.steps)},
        "data_file": str(data_path),
        "model_dir": str(model_dir),
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(summary_path, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass(frozen=True)
class EvalDialogue:
    """An evaluation dialogue: user turns and the checkable instruction given at the start."""

    instruction: Instruction
    user_turns: tuple[str, ...]


def make_eval_dialogues(dialogues: Sequence[Any], space: InstructionSpace,
                        checker: InstructionChecker, *, seed: int, max_turns: int = 0
                        ) -> list[EvalDialogue]:
    """Pair each dialogue with an instruction of one checkable constraint drawn from `space`.

    Raises:
        ValueError: If `space` has no checkable kind with a positive weight.
    """
    checkable = [kind for kind, weight in space.kind_weights.items() if weight > 0
                 and (kind in ALWAYS_CHECKABLE or (kind == "language" and all(
                     checker.is_checkable(Constraint(kind, v)) for v in space.values[kind])))]
    if not checkable:
        raise ValueError(f"the evaluation instructions {dict(space.kind_weights)} have no "
                         "checkable kind with a positive weight")
    one_constraint = dataclasses.replace(space, max_constraints=1)
    rng = np.random.default_rng([seed, _STREAM_EVALUATION])
    result = []
    for dialogue in dialogues:
        turns = user_turns_of(dialogue)
        if max_turns:
            turns = turns[:max_turns]
        result.append(EvalDialogue(one_constraint.draw(rng, kinds=checkable), tuple(turns)))
    return result


def evaluate_following(
    sampler: sampling_lib.Sampler,
    params: Any,
    tokenizer: Tokenizer,
    eval_dialogues: Sequence[EvalDialogue],
    checker: InstructionChecker,
    *,
    placement: str,
    batch_size: int,
    max_prompt_length: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer each evaluation dialogue turn by turn with the instruction only in the first turn,
    and measure per turn index the fraction of answers that follow it.

    Returns:
        {"per_turn": [{"turn", "dialogues", "followed", "rate"}, ...] for turns 1, 2, ...,
        "rate": over all turns, "rate_turns_from_4": over turns >= 4, "finished_rate": share of
        answers that ended with EOS, "too_long": dialogues cut because a prompt did not fit,
        "dialogues": the instructions and answers}.
    """
    generated = generate_dialogues(
        sampler, tokenizer, [d.user_turns for d in eval_dialogues],
        [d.instruction.text() for d in eval_dialogues], jax.random.key(seed), every_turn=False,
        placement=placement, batch_size=batch_size, max_prompt_length=max_prompt_length,
        params=params, progress="evaluation turns")
    num_turns = max(len(g.answers) for g in generated) if generated else 0
    counts = np.zeros(num_turns, np.int64)
    followed = np.zeros(num_turns, np.int64)
    records = []
    finished = []
    for dialogue, result in zip(eval_dialogues, generated, strict=True):
        flags = [bool(checker.follows_instruction(dialogue.instruction, answer))
                 for answer in result.answers]
        counts[:len(flags)] += 1
        followed[:len(flags)] += np.asarray(flags, np.int64)
        finished += result.finished
        records.append({"instruction": dialogue.instruction.text(),
                        "answers": result.answers, "followed": flags,
                        "stop_reason": result.stop_reason})
    per_turn = [{"turn": t + 1, "dialogues": int(counts[t]), "followed": int(followed[t]),
                 "rate": float(followed[t] / counts[t])} for t in range(num_turns) if counts[t]]
    return {
        "per_turn": per_turn,
        "per_instruction": _rates_per_instruction(records),
        "rate": float(followed.sum() / max(counts.sum(), 1)),
        "rate_turns_from_4": float(followed[3:].sum() / max(counts[3:].sum(), 1)),
        "answers": int(counts.sum()),
        "finished_rate": float(np.mean(finished)) if finished else 0.0,
        "too_long": sum(r.stop_reason == "too_long" for r in generated),
        "dialogues": records,
    }


def _rates_per_instruction(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Return per instruction text the following rate in the first turn and in later turns."""
    flags: dict[str, tuple[list[bool], list[bool]]] = {}
    for record in records:
        first, later = flags.setdefault(record["instruction"], ([], []))
        first += record["followed"][:1]
        later += record["followed"][1:]
    return {text: {"dialogues": len(first),
                   "first_turn_rate": float(np.mean(first)) if first else 0.0,
                   "later_turns": len(later),
                   "later_turns_rate": float(np.mean(later)) if later else 0.0}
            for text, (first, later) in sorted(flags.items())}


def instruction_table_markdown(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Format the following rates per instruction, in turn 1 and in turns >= 2, before and after
    GAtt, as a markdown table."""
    lines = ["| instruction | dialogues | turn 1 before | turn 1 after | turns ≥ 2 before | "
             "turns ≥ 2 after |", "|---|---:|---:|---:|---:|---:|"]
    for text, old in before["per_instruction"].items():
        new = after["per_instruction"].get(text)
        if new is None:
            continue
        lines.append(f"| {text} | {old['dialogues']} | {100 * old['first_turn_rate']:.1f}% | "
                     f"{100 * new['first_turn_rate']:.1f}% | "
                     f"{100 * old['later_turns_rate']:.1f}% | "
                     f"{100 * new['later_turns_rate']:.1f}% |")
    return "\n".join(lines) + "\n"


def following_table_markdown(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Format the per-turn following rates before and after GAtt as a markdown table."""
    rows = {entry["turn"]: [entry, None] for entry in before["per_turn"]}
    for entry in after["per_turn"]:
        rows.setdefault(entry["turn"], [None, None])[1] = entry
    lines = ["| turn | dialogues | before GAtt | after GAtt |", "|---:|---:|---:|---:|"]

    def cell(entry):
        if entry is None:
            return "–"
        return f"{100 * entry['rate']:.1f}% ({entry['followed']}/{entry['dialogues']})"

    for turn in sorted(rows):
        first, second = rows[turn]
        count = (first or second)["dialogues"]
        lines.append(f"| {turn} | {count} | {cell(first)} | {cell(second)} |")
    lines.append(f"| ≥ 4 | | {100 * before['rate_turns_from_4']:.1f}% | "
                 f"{100 * after['rate_turns_from_4']:.1f}% |")
    lines.append(f"| all | | {100 * before['rate']:.1f}% | {100 * after['rate']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot_following(before: Mapping[str, Any], after: Mapping[str, Any],
                   path: str | os.PathLike, title: str) -> None:
    """Plot the per-turn following rate before and after GAtt to a PNG file."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for result, label in ((before, "before GAtt"), (after, "after GAtt")):
        turns = [entry["turn"] for entry in result["per_turn"]]
        rates = [100 * entry["rate"] for entry in result["per_turn"]]
        axis.plot(turns, rates, marker="o", label=label)
    axis.set_xlabel("dialogue turn")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("answers following the instruction (%)")
    axis.set_ylim(-5, 105)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The base policy of the tiny run.


def instruction_sft_dialogues(world: Any, space: InstructionSpace, *, num_dialogues: int,
                              min_turns: int, max_turns: int, instruction_probability: float,
                              seed: int) -> list[list[Message]]:
    """Draw synthetic-world dialogues in which any user message may start with an instruction
    that governs only that turn's answer.

    Each turn independently carries an instruction with probability
    `instruction_probability`. The instruction is drawn from the rewritable and free-form kinds
    of `space` and written in its short form with probability `space.shorten_probability`. Its
    turn's answer is the world's ideal answer rewritten to follow it (`rewrite_to_follow`), and
    the other turns get plain ideal answers. A policy fine-tuned on these dialogues follows an
    instruction only in its own turn.

    Args:
        world: A `llama_rlhf.data.synthetic.SyntheticWorld`.
        space: The instructions to draw from.
        num_dialogues, min_turns, max_turns: Passed to `world.multi_turn_dialogues`.
        instruction_probability: The chance that a turn carries an instruction.
        seed: The sampling seed.
    """
    if not 0.0 <= instruction_probability <= 1.0:
        raise ValueError(f"instruction_probability is {instruction_probability}, expected a "
                         "probability in [0, 1]")
    rng = np.random.default_rng([seed, _STREAM_BASE_POLICY])
    dialogues = []
    for source in world.multi_turn_dialogues(num_dialogues, min_turns, max_turns, seed=seed):
        messages = []
        for user_message, request in zip(source.messages[0::2], source.requests, strict=True):
            answer = world.ideal_answer(request)
            user_text = user_message.content
            if rng.random() < instruction_probability:
                instruction = space.draw(rng, kinds=(*REWRITABLE, *FREE_FORM))
                answer = rewrite_to_follow(instruction, answer)
                user_text = f"{instruction.text(short=space.draw_short(rng))} {user_text}"
            messages += [Message("user", user_text), Message("assistant", answer)]
        dialogues.append(messages)
    return dialogues


def build_base_policy(config: ml_collections.ConfigDict, workdir: pathlib.Path, world: Any,
                      tokenizer: Tokenizer) -> str:
    """Fine-tune the tiny run's base policy with the SFT stage (reused when its settings are
    unchanged) and return its model folder."""
    base = config.base_policy
    directory = workdir / BASE_POLICY_DIR
    summary_path = directory / SUMMARY_FILE
    fingerprint = _fingerprint({"base_policy": _config_json(base),
                                "instructions": _config_json(config.instructions),
                                "world": repr(world), "tokenizer": str(tokenizer.source)})
    model_dir = directory / "sft" / sft.MODEL_DIR
    if summary_path.is_file() and model_dir.is_dir():
        if json.loads(summary_path.read_text()).get("fingerprint") == fingerprint:
            return str(model_dir)
    space = InstructionSpace.from_config(config.instructions)
    dialogues = instruction_sft_dialogues(
        world, space, num_dialogues=int(base.num_dialogues), min_turns=int(base.min_turns),
        max_turns=int(base.max_turns), instruction_probability=float(base.instruction_probability),
        seed=int(base.seed))
    examples = [encode_for_training(tokenizer, messages) for messages in dialogues]
    sft_config = base.sft.copy_and_resolve_references()
    sft_config.data.tokenizer = str(tokenizer.source)
    logger.info("Fine-tuning the base policy on %d synthetic dialogues.", len(examples))
    result = sft.train_on_examples(sft_config, directory / "sft", examples, tokenizer=tokenizer,
                                   metadata={"stage": "ghost_attention_base_policy"})
    write_json_atomic(summary_path, {"fingerprint": fingerprint, "metrics": result.metrics,
                                     "steps": result.steps, "model_dir": str(result.model_dir)})
    return str(result.model_dir)


# ---------------------------------------------------------------------------------------------
# Entry point.


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.examples not in EXAMPLE_MODES:
        raise ValueError(f"config.examples is {config.examples!r}, expected one of "
                         f"{EXAMPLE_MODES}")
    if config.placement not in PLACEMENTS:
        raise ValueError(f"config.placement is {config.placement!r}, expected one of "
                         f"{PLACEMENTS}")
    for name in ("batch_size", "num_samples", "max_new_tokens", "max_prompt_length"):
        if int(config.sampling[name]) < 1:
            raise ValueError(f"config.sampling.{name} is {config.sampling[name]}, expected a "
                             "positive integer")


def _evaluate_model(config: ml_collections.ConfigDict, path: pathlib.Path, model_dir: str,
                    tokenizer: Tokenizer, eval_dialogues: Sequence[EvalDialogue],
                    checker: InstructionChecker, cache: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one model, reusing `path` when it was written for the same model and set."""
    fingerprint = _fingerprint({
        "format": EVAL_FORMAT_VERSION,
        "model": model_identity(model_dir), "evaluation": _config_json(config.evaluation),
        "placement": config.placement, "tokenizer": str(tokenizer.source),
        "dialogues": [[d.instruction.to_json(), list(d.user_turns)] for d in eval_dialogues]})
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored
    mesh = sft.create_mesh_from_config(config)
    policy = load_initial_params(model_dir, head="lm", rng=jax.random.key(0), mesh=mesh)
    if "sampler" not in cache:
        cache["sampler"] = make_sampler(
            policy.config, config.sampling, tokenizer, greedy=True, mesh=mesh,
            max_new_tokens=int(config.evaluation.max_new_tokens))
    start = time.perf_counter()
    result = evaluate_following(
        cache["sampler"], policy.params, tokenizer, eval_dialogues, checker,
        placement=config.placement, batch_size=int(config.evaluation.batch_size),
        max_prompt_length=int(config.evaluation.max_prompt_length),
        seed=int(config.evaluation.seed))
    result.update(fingerprint=fingerprint, model_dir=str(model_dir),
                  seconds=time.perf_counter() - start)
    write_json_atomic(path, result)
    return result


def _synthetic_inputs(config: ml_collections.ConfigDict, workdir: pathlib.Path):
    """Build the tokenizer, base policy, GAtt dialogues and evaluation dialogues of the tiny
    run."""
    from llama_rlhf.data import synthetic  # noqa: PLC0415 (only the synthetic run needs it)

    settings = config.synthetic
    world = synthetic.SyntheticWorld(int(settings.world_seed), int(settings.num_animals))
    tokenizer = synthetic.build_tokenizer(workdir, int(settings.vocab_size), world=world)
    policy_init = config.policy_init or build_base_policy(config, workdir, world, tokenizer)
    dialogues = world.multi_turn_dialogues(
        int(settings.num_gatt_dialogues), int(settings.gatt_min_turns),
        int(settings.gatt_max_turns), seed=int(settings.gatt_seed))
    eval_dialogues = world.multi_turn_dialogues(
        int(config.evaluation.num_dialogues), int(config.evaluation.min_turns),
        int(config.evaluation.max_turns), seed=int(config.evaluation.seed) + 1)
    return tokenizer, policy_init, dialogues, eval_dialogues


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Evaluate the policy, run GAtt on it, evaluate the new policy and write the report.

    With `config.synthetic.enabled` (the tiny variant) the tokenizer, the base policy and the
    dialogues come from the synthetic world under `workdir`. Otherwise they come from
    `config.tokenizer`, `config.policy_init`, `config.data.dialogues` and
    `config.evaluation.dialogues`.

    Returns:
        The GAtt summary plus "before" and "after" (per-turn following rates without the
        generated answers), and the paths of the report and the plot.
    """
    _check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(workdir, config)
    if config.synthetic.enabled:
        tokenizer, policy_init, dialogues, eval_source = _synthetic_inputs(config, workdir)
    else:
        for field in ("policy_init", "tokenizer", "data.dialogues", "evaluation.dialogues"):
            value = config
            for part in field.split("."):
                value = value[part]
            if not value:
                raise ValueError(f"config.{field} is empty; the {config.variant} variant "
                                 "needs it")
        tokenizer = load_tokenizer(config.tokenizer)
        policy_init = config.policy_init
        dialogues = sft.read_dialogues_jsonl(config.data.dialogues)
        eval_source = sft.read_dialogues_jsonl(config.evaluation.dialogues)
        if config.evaluation.num_dialogues:
            eval_source = eval_source[: int(config.evaluation.num_dialogues)]
    if config.data.max_dialogues:
        dialogues = dialogues[: int(config.data.max_dialogues)]

    eval_space = InstructionSpace.from_config(config.instructions,
                                              kind_weights=config.evaluation.kind_weights)
    checker = InstructionChecker.from_config(config.instructions)
    eval_dialogues = make_eval_dialogues(eval_source, eval_space, checker,
                                         seed=int(config.evaluation.seed),
                                         max_turns=int(config.evaluation.max_turns))
    cache: dict[str, Any] = {}
    before = _evaluate_model(config, workdir / EVAL_BEFORE_FILE, policy_init, tokenizer,
                             eval_dialogues, checker, cache)
    logger.info("Before GAtt: %.1f%% of answers follow the instruction, %.1f%% at turns >= 4.",
                100 * before["rate"], 100 * before["rate_turns_from_4"])

    summary = run_ghost_attention(config, workdir, policy_init=policy_init, tokenizer=tokenizer,
                                  dialogues=dialogues)
    after = _evaluate_model(config, workdir / EVAL_AFTER_FILE, summary["model_dir"], tokenizer,
                            eval_dialogues, checker, cache)
    logger.info("After GAtt: %.1f%% of answers follow the instruction, %.1f%% at turns >= 4.",
                100 * after["rate"], 100 * after["rate_turns_from_4"])

    table = following_table_markdown(before, after)
    title = f"Instruction following per turn ({len(eval_dialogues)} dialogues)"
    report = (f"# Ghost Attention: instruction following per turn\n\n"
              f"Policy before: `{policy_init}`; after: `{summary['model_dir']}`.\n"
              f"{len(eval_dialogues)} evaluation dialogues of {config.evaluation.min_turns} to "
              f"{config.evaluation.max_turns} turns, one checkable instruction in the first "
              f"turn only, greedy answers. Each cell is the share of answers at that turn "
              f"that follow the instruction.\n\n{table}\n"
              f"Per instruction:\n\n{instruction_table_markdown(before, after)}")
    write_text_atomic(workdir / REPORT_FILE, report)
    plot_following(before, after, workdir / PLOT_FILE, title)
    print(table)

    def without_answers(result):
        return {k: v for k, v in result.items() if k not in ("dialogues", "fingerprint")}

    return {**summary, "before": without_answers(before), "after": without_answers(after),
            "report_file": str(workdir / REPORT_FILE), "plot_file": str(workdir / PLOT_FILE)}
