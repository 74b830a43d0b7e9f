"""Tests of Ghost Attention: instructions, checkers, loss masks, data construction, evaluation
and a tiny end-to-end run."""

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from configs import ghost_attention as gatt_configs
from llama_rlhf import ghost_attention as gatt
from llama_rlhf import sampling as sampling_lib
from llama_rlhf.data import synthetic
from llama_rlhf.data.chat import Message
from llama_rlhf.data.tokenizer import load_tokenizer, train_sentencepiece
from llama_rlhf.training.checkpoints import load_model

FRENCH = gatt.Instruction((gatt.Constraint("language", "French"),))
# A 3-turn GAtt dialogue whose answers were sampled with the instruction in every user turn.
THREE_TURNS = gatt.GattDialogue(FRENCH, "Speak in French.", ("Hi", "How are you?", "Bye"),
                                ("Bonjour", "Bien", "Au revoir"), source_index=0)
WELL = gatt.Instruction((gatt.Constraint("starts_with", "well"),))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """Train a SentencePiece model on a fixed corpus. Training is single-threaded and keeps the
    input order, so the pieces and ids are the same on every run."""
    corpus = ["[INST] Speak in French. Hi [/INST] Bonjour ", "[INST] How are you? [/INST] Bien ",
              "[INST] Bye [/INST] Au revoir ", "Language: French."] * 30
    prefix = tmp_path_factory.mktemp("gatt_tokenizer") / "small"
    train_sentencepiece(corpus, prefix, vocab_size=300)
    return load_tokenizer(prefix.with_suffix(".model"))


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    return synthetic.build_tokenizer(tmp_path_factory.mktemp("world"),
                                     world=synthetic.SyntheticWorld())


# ---------------------------------------------------------------------------------------------
# Loss masks.


def test_loss_mask_three_turns_llama2(shared):
    tokenizer = load_tokenizer(shared / "models/llama2-tokenizer/tokenizer.model")
    [(ids, loss_mask)] = gatt.gatt_examples(tokenizer, THREE_TURNS, mode="last")

    # Expected ids: Llama 2's tokenizer on Meta's chat format, one exchange per line, pieces:
    # <s> ▁[ INST ] ▁Spe ak ▁in ▁French . ▁Hi ▁[ / INST ] ▁Bon j our ▁ </s>
    # <s> ▁[ INST ] ▁How ▁are ▁you ? ▁[ / INST ] ▁Bien ▁ </s>
    # <s> ▁[ INST ] ▁By e ▁[ / INST ] ▁Au ▁re voir ▁ </s>
    assert ids == [
        1, 518, 25580, 29962, 5013, 557, 297, 5176, 29889, 6324, 518, 29914, 25580, 29962,
        8396, 29926, 473, 29871, 2,
        1, 518, 25580, 29962, 1128, 526, 366, 29973, 518, 29914, 25580, 29962, 26219, 29871, 2,
        1, 518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962, 8407, 337, 7869, 29871, 2,
    ]  # fmt: skip
    # Expected mask, written by hand from the pieces above: only "▁Au ▁re voir ▁ </s>", the
    # last answer with its trailing space and EOS, is learned; the instruction, both user
    # turns and the first two answers are not.
    assert loss_mask == [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
    ]  # fmt: skip


def test_loss_mask_three_turns_every_turn_llama2(shared):
    tokenizer = load_tokenizer(shared / "models/llama2-tokenizer/tokenizer.model")
    examples = gatt.gatt_examples(tokenizer, THREE_TURNS, mode="every_turn")

    # Expected masks by hand from the pieces of the previous test: example k is the dialogue
    # up to turn k, and only answer k ("▁Bon j our ▁ </s>", "▁Bien ▁ </s>", then the last) is
    # learned.
    assert [mask for _, mask in examples] == [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    ]  # fmt: skip
    full_ids, _ = gatt.gatt_examples(tokenizer, THREE_TURNS, mode="last")[0]
    for ids, _ in examples:
        assert ids == full_ids[: len(ids)]


def test_loss_mask_three_turns_small_tokenizer(small_tokenizer):
    [(ids, loss_mask)] = gatt.gatt_examples(small_tokenizer, THREE_TURNS, mode="last")
    pieces = [small_tokenizer.id_to_piece(i) for i in ids]

    # Expected pieces and mask by hand: the small model splits most words into characters.
    # Only the last answer "▁ A u ▁ re v o i r ▁ </s>" is learned.
    assert pieces == [
        "<s>", "▁[", "INST", "]", "▁", "S", "p", "e", "a", "k", "▁", "i", "n", "▁", "F", "re",
        "n", "ch", ".", "▁", "H", "i", "▁[/", "INST", "]", "▁B", "o", "n", "j", "ou", "r", "▁",
        "</s>",
        "<s>", "▁[", "INST", "]", "▁", "H", "o", "w", "▁", "a", "re", "▁", "y", "ou", "?", "▁[/",
        "INST", "]", "▁B", "i", "e", "n", "▁", "</s>",
        "<s>", "▁[", "INST", "]", "▁B", "y", "e", "▁[/", "INST", "]", "▁", "A", "u", "▁", "re",
        "v", "o", "i", "r", "▁", "</s>",
    ]  # fmt: skip
    assert loss_mask == [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ]  # fmt: skip


def test_loss_mask_system_placement(small_tokenizer):
    [(ids, loss_mask)] = gatt.gatt_examples(small_tokenizer, THREE_TURNS, mode="last",
                                            placement="system")
    text = small_tokenizer.decode(ids)

    # Llama 2's format merges the system message into the first user turn between <<SYS>>
    # tags; the learned tokens are still only the last answer's.
    assert text.count("Speak in French.") == 1
    assert text.index("<<SYS>>") < text.index("Speak in French.") < text.index("Hi")
    learned = [i for i, m in zip(ids, loss_mask, strict=True) if m]
    assert small_tokenizer.decode(learned).strip() == "Au revoir"


def test_examples_reject_unknown_mode(small_tokenizer):
    with pytest.raises(ValueError, match="examples mode"):
        gatt.gatt_examples(small_tokenizer, THREE_TURNS, mode="all")


# ---------------------------------------------------------------------------------------------
# Instructions.


@pytest.mark.parametrize("constraint, verbose, short", [
    (gatt.Constraint("hobby", "tennis"), "You enjoy tennis.", "Hobby: tennis."),
    (gatt.Constraint("language", "French"), "Speak in French.", "Language: French."),
    (gatt.Constraint("figure", "Napoleon"), "Act as Napoleon.", "Figure: Napoleon."),
    (gatt.Constraint("capitals"), "Always answer in capital letters.",
     "Format: capital letters."),
    (gatt.Constraint("ends_with", "friend"), "Always end your answer with the word friend.",
     "Last word: friend."),
    (gatt.Constraint("ends_with", "thank you"),
     "Always end your answer with the words thank you.", "Last word: thank you."),
    (gatt.Constraint("avoid_letter", "e"), "Never use the letter e.", "Banned letter: e."),
])
def test_constraint_texts(constraint, verbose, short):
    # Expected texts: the forms Llama 2 uses ("You enjoy ...", "Speak in ...", "Act as ...",
    # shortened to "Figure: Napoleon."), and for checkable kinds the module's templates.
    assert constraint.text() == verbose
    assert constraint.text(short=True) == short


@pytest.mark.parametrize("kind, value, message", [
    ("mood", "happy", "constraint kind"),
    ("hobby", "", "needs a value"),
    ("capitals", "yes", "takes no value"),
    ("avoid_letter", "ee", "one letter"),
    ("ends_with", "!!", "contain a word"),
])
def test_constraint_rejects_invalid(kind, value, message):
    with pytest.raises(ValueError, match=message):
        gatt.Constraint(kind, value)


def test_instruction_rejects_conflicting_constraints():
    with pytest.raises(ValueError, match="same group"):
        gatt.Instruction((gatt.Constraint("capitals"), gatt.Constraint("lower_case")))


def test_instruction_json_round_trip():
    instruction = gatt.Instruction((gatt.Constraint("figure", "Napoleon"),
                                    gatt.Constraint("ends_with", "friend")))
    assert gatt.Instruction.from_json(instruction.to_json()) == instruction
    assert instruction.text() == "Act as Napoleon. Always end your answer with the word friend."
    assert instruction.text(short=True) == "Figure: Napoleon. Last word: friend."
    with pytest.raises(ValueError, match="expected a list"):
        gatt.Instruction.from_json({"kind": "hobby"})


def _default_space(**changes):
    """Build the instruction space of the 7b variant (every kind, the default lists)."""
    space = gatt.InstructionSpace.from_config(gatt_configs.get_config("7b").instructions)
    return dataclasses.replace(space, **changes)


def test_space_shortens_half_the_time():
    space = _default_space()
    rng = np.random.default_rng(0)
    draws = [space.draw_short(rng) for _ in range(4000)]

    # Expected: a Bernoulli(0.5) mean of 4000 draws lies within 4 standard deviations
    # (4 * 0.0079) of 0.5; the same seed gives the same draws.
    assert abs(np.mean(draws) - 0.5) < 0.032
    again = np.random.default_rng(0)
    assert [space.draw_short(again) for _ in range(4000)] == draws


def test_space_draws_combinations():
    space = _default_space(max_constraints=3)
    rng = np.random.default_rng(1)
    instructions = [space.draw(rng) for _ in range(2000)]
    sizes = [len(i.constraints) for i in instructions]

    # Expected: the number of constraints is uniform on 1..3, every kind is drawn, and no
    # instruction contains two constraints of one kind or both letter cases.
    assert set(sizes) == {1, 2, 3}
    assert all(abs(sizes.count(n) / len(sizes) - 1 / 3) < 0.05 for n in (1, 2, 3))
    kinds = [c.kind for i in instructions for c in i.constraints]
    assert set(kinds) == set(gatt.CONSTRAINT_KINDS)
    for instruction in instructions:
        own = [c.kind for c in instruction.constraints]
        assert len(set(own)) == len(own)
        assert not {"capitals", "lower_case"} <= set(own)
    figures = {c.value for i in instructions for c in i.constraints if c.kind == "figure"}
    assert figures == set(gatt.DEFAULT_FIGURES)


def test_space_draw_is_seeded():
    space = _default_space(max_constraints=3)
    first = [space.draw(np.random.default_rng(5)) for _ in range(3)]
    second = [space.draw(np.random.default_rng(5)) for _ in range(3)]
    assert first == second


def test_space_draws_only_requested_kinds():
    space = _default_space(max_constraints=3)
    rng = np.random.default_rng(2)
    for _ in range(200):
        instruction = space.draw(rng, kinds=("hobby", "capitals"))
        assert {c.kind for c in instruction.constraints} <= {"hobby", "capitals"}
    with pytest.raises(ValueError, match="positive weight"):
        space.draw(rng, kinds=("mood",))


def test_space_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown kinds"):
        gatt.InstructionSpace({"mood": 1.0}, {})
    with pytest.raises(ValueError, match="no values"):
        gatt.InstructionSpace({"hobby": 1.0}, {"hobby": ()})
    with pytest.raises(ValueError, match="not all 0"):
        gatt.InstructionSpace({"capitals": 0.0}, {})
    with pytest.raises(ValueError, match="one letter"):
        gatt.InstructionSpace({"avoid_letter": 1.0}, {"avoid_letter": ("ab",)})


# ---------------------------------------------------------------------------------------------
# Checkers.


@pytest.mark.parametrize("function, answer, argument, expected", [
    (gatt.is_capitalized, "THE FOX IS RED, FRIEND.", None, True),
    (gatt.is_capitalized, "THE FOX IS Red.", None, False),
    (gatt.is_capitalized, "123 !", None, False),
    (gatt.is_capitalized, "ÉTÉ 2023", None, True),
    (gatt.is_lower_case, "the fox is red.", None, True),
    (gatt.is_lower_case, "The fox is red.", None, False),
    (gatt.is_lower_case, "", None, False),
    (gatt.ends_with_words, "The fox is red, friend.", "friend", True),
    (gatt.ends_with_words, "The fox is red, FRIEND!", "friend", True),
    (gatt.ends_with_words, "Friend, the fox is red.", "friend", False),
    (gatt.ends_with_words, "The fox is red, befriend.", "friend", False),
    (gatt.ends_with_words, "Bye, and thank you.", "thank you", True),
    (gatt.ends_with_words, "Thank you, bye.", "thank you", False),
    (gatt.starts_with_words, "Well, the fox is red.", "well", True),
    (gatt.starts_with_words, "Wellington is a city.", "well", False),
    (gatt.starts_with_words, "The fox is well.", "well", False),
    (gatt.avoids_letter, "A fox is Lucky.", "e", True),
    (gatt.avoids_letter, "The fox.", "e", False),
    (gatt.avoids_letter, "ELK", "e", False),
    (gatt.avoids_letter, "...", "e", False),
])
def test_checkers(function, answer, argument, expected):
    # Expected values by reading each answer against the rule in the checker's docstring.
    result = function(answer) if argument is None else function(answer, argument)
    assert result is expected


@pytest.mark.parametrize("answer, language, expected", [
    ("Je suis un renard et je vis dans la forêt.", "French", True),
    ("Je suis un renard et je vis dans la forêt.", "English", False),
    ("El zorro es rojo y vive en el bosque.", "Spanish", True),
    ("The fox is red and it lives in the forest.", "English", True),
    ("The fox is red and it lives in the forest.", "French", False),
    ("Der Fuchs ist rot und lebt im Wald.", "German", True),
    ("", "French", False),
])
def test_language_checker(answer, language, expected):
    # Expected: the language the sentence is written in, by reading it.
    words = gatt.DEFAULT_LANGUAGE_WORDS
    assert gatt.is_in_language(answer, language, words) is expected


def test_language_checker_needs_word_list():
    with pytest.raises(KeyError, match="no word list"):
        gatt.is_in_language("Hallo", "Dutch", gatt.DEFAULT_LANGUAGE_WORDS)


def test_instruction_checker_combines_constraints():
    checker = gatt.InstructionChecker()
    instruction = gatt.Instruction((gatt.Constraint("figure", "Napoleon"),
                                    gatt.Constraint("capitals"),
                                    gatt.Constraint("ends_with", "friend")))
    assert checker.follows_instruction(instruction, "I AM THE EMPEROR, FRIEND.") is True
    assert checker.follows_instruction(instruction, "I AM THE EMPEROR.") is False
    assert checker.follows_instruction(instruction, "I am the emperor, friend.") is False
    hobby_only = gatt.Instruction((gatt.Constraint("hobby", "tennis"),))
    assert checker.follows_instruction(hobby_only, "anything") is None
    with pytest.raises(ValueError, match="cannot be checked"):
        checker.follows(gatt.Constraint("hobby", "tennis"), "anything")


def test_language_is_checkable_only_with_word_lists():
    french = gatt.Constraint("language", "French")
    assert gatt.InstructionChecker().is_checkable(french)
    assert not gatt.InstructionChecker({}).is_checkable(french)
    assert not gatt.InstructionChecker({"French": ("le",)}).is_checkable(french)
    assert not gatt.InstructionChecker().is_checkable(gatt.Constraint("language", "Dutch"))


@pytest.mark.parametrize("constraints", [
    (gatt.Constraint("capitals"),),
    (gatt.Constraint("lower_case"),),
    (gatt.Constraint("ends_with", "friend"),),
    (gatt.Constraint("starts_with", "well"),),
    (gatt.Constraint("hobby", "chess"), gatt.Constraint("starts_with", "arr"),
     gatt.Constraint("capitals")),
    (gatt.Constraint("ends_with", "goodbye"), gatt.Constraint("lower_case")),
])
def test_rewrite_makes_answers_follow(constraints):
    instruction = gatt.Instruction(constraints)
    checker = gatt.InstructionChecker()
    for answer in ("The fox is red.", "I can't help with that.", "One, two, three."):
        assert checker.follows_instruction(instruction, answer) is False
        assert checker.follows_instruction(instruction,
                                           gatt.rewrite_to_follow(instruction, answer)) is True


def test_rewrite_examples():
    # Expected strings: the rewriting rule of the docstring applied by hand.
    ends = gatt.Instruction((gatt.Constraint("ends_with", "friend"),))
    starts = gatt.Instruction((gatt.Constraint("starts_with", "well"),))
    assert gatt.rewrite_to_follow(ends, "The fox is red.") == "The fox is red, friend."
    assert gatt.rewrite_to_follow(starts, "The fox is red.") == "Well, the fox is red."
    assert gatt.rewrite_to_follow(starts, "I like it.") == "Well, I like it."
    figure = gatt.Instruction((gatt.Constraint("figure", "Napoleon"),))
    assert gatt.rewrite_to_follow(figure, "The fox is red.") == "The fox is red."
    letter = gatt.Instruction((gatt.Constraint("avoid_letter", "e"),))
    assert gatt.rewrite_to_follow(letter, "The fox is red.") is None


# ---------------------------------------------------------------------------------------------
# Dialogues, generation and data construction.


def test_instructed_messages_places_instruction():
    users, answers = ["Hi", "Why?", "Bye"], ["Yes", "No"]
    every = gatt.instructed_messages(users, answers, "Act as Napoleon.", every_turn=True)
    first = gatt.instructed_messages(users, answers, "Act as Napoleon.", every_turn=False)
    system = gatt.instructed_messages(users, answers, "Act as Napoleon.", every_turn=False,
                                      placement="system")
    assert [m.content for m in every if m.role == "user"] == [
        "Act as Napoleon. Hi", "Act as Napoleon. Why?", "Act as Napoleon. Bye"]
    assert [m.content for m in first if m.role == "user"] == ["Act as Napoleon. Hi", "Why?", "Bye"]
    assert system[0] == Message("system", "Act as Napoleon.")
    assert [m.content for m in system if m.role == "user"] == users
    with pytest.raises(ValueError, match="answers"):
        gatt.instructed_messages(users, ["a"], "x", every_turn=True)
    with pytest.raises(ValueError, match="placement"):
        gatt.instructed_messages(users, answers, "x", every_turn=False, placement="last")


class ScriptedSampler:
    """Stands in for `sampling.Sampler`: answers each prompt with `respond(turn, last user
    message)`, a list of num_samples texts, and records the prompts it was given."""

    def __init__(self, tokenizer, respond, num_samples=1):
        self.tokenizer = tokenizer
        self.respond = respond
        self.sampling = sampling_lib.SamplingConfig(max_new_tokens=32, num_samples=num_samples)
        self.model_config = types.SimpleNamespace(max_seq_len=4096)
        self.prompts = []
        self.batch_sizes = []

    def generate_ids(self, prompts, rng, *, params=None, max_new_tokens=None):
        del rng, params, max_new_tokens
        self.batch_sizes.append(len(prompts))
        outputs = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            turn = text.count("[/INST]")
            last_user = text.rsplit("[INST]", 1)[1]
            outputs.append([self.tokenizer.encode(answer) + [self.tokenizer.eos_id]
                            for answer in self.respond(turn, last_user)])
        return outputs


def _user_turns(prompt_text):
    return [part.split("[/INST]")[0] for part in prompt_text.split("[INST]")[1:]]


def test_generate_dialogues_appends_answers(small_tokenizer):
    sampler = ScriptedSampler(small_tokenizer, lambda turn, user: [f"Answer {turn}."])
    results = gatt.generate_dialogues(
        sampler, small_tokenizer, [["a", "b", "c"], ["d"], ["e", "f"]], ["Act as X."] * 3,
        rng=jax.random.key(0), every_turn=True, batch_size=2, max_prompt_length=4096)

    assert [r.answers for r in results] == [
        ["Answer 1.", "Answer 2.", "Answer 3."], ["Answer 1."], ["Answer 1.", "Answer 2."]]
    assert all(r.stop_reason == "complete" and all(r.finished) for r in results)
    # Every call has the full batch of 2 rows, padding included.
    assert set(sampler.batch_sizes) == {2}
    # The prompt of turn 3 contains the first two answers.
    last = [p for p in sampler.prompts if p.count("[/INST]") == 3][0]
    assert "Answer 1." in last
    assert "Answer 2." in last


def test_generate_dialogues_stops_long_prompts(small_tokenizer):
    sampler = ScriptedSampler(small_tokenizer, lambda turn, user: ["A long answer " * 5])
    results = gatt.generate_dialogues(
        sampler, small_tokenizer, [["a", "b", "c"]], ["Act as X."], rng=jax.random.key(0),
        every_turn=True, batch_size=1, max_prompt_length=70)
    assert results[0].stop_reason == "too_long"
    assert 1 <= len(results[0].answers) < 3


def _gatt_config(**changes):
    config = gatt_configs.get_config("tiny,smoke")
    config.unlock()
    config.instructions.kind_weights = {"starts_with": 1.0, "hobby": 1.0}
    config.instructions.start_words = ("well",)
    config.instructions.max_constraints = 1
    config.sampling.batch_size = 2
    config.rejection.use_checker = True
    config.rejection.require_eos = True
    for key, value in changes.items():
        node = config
        *parents, name = key.split(".")
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def _use_sampler(monkeypatch, sampler):
    """Let build_gatt_data sample with `sampler` instead of loading a policy."""
    monkeypatch.setattr(gatt, "load_initial_params",
                        lambda *args, **kwargs: types.SimpleNamespace(params=None, config=None))
    monkeypatch.setattr(gatt, "make_sampler", lambda *args, **kwargs: sampler)


def _well_or_plain(turn, user):
    """Two samples per turn: a plain answer first, then one that starts with "well"."""
    return [f"Plain answer {turn}.", f"Well, answer {turn}."]


MULTI_TURN = [[m for t in range(3) for m in (Message("user", f"Question {i}.{t}?"),
                                             Message("assistant", "An old answer."))]
              for i in range(5)]


def test_build_data_instruction_in_every_sampled_turn(small_tokenizer, tmp_path, monkeypatch):
    sampler = ScriptedSampler(small_tokenizer, _well_or_plain, num_samples=2)
    _use_sampler(monkeypatch, sampler)
    dialogues, statistics = gatt.build_gatt_data(
        _gatt_config(), tmp_path, policy_init="unused", tokenizer=small_tokenizer,
        dialogues=MULTI_TURN)

    assert len(dialogues) == 5
    for prompt in sampler.prompts:
        turns = _user_turns(prompt)
        instructions = {t.split(" Question")[0].strip() for t in turns}
        # While sampling, every user turn of the prompt carries the same verbose instruction.
        assert len(instructions) == 1
        assert instructions.pop().startswith(("You enjoy", "Always start"))
    # Training data: the instruction only in the first turn, the answers of the old
    # dialogues replaced by sampled ones.
    for dialogue in dialogues:
        users = [m.content for m in dialogue.messages() if m.role == "user"]
        assert users[0] == f"{dialogue.instruction_text} {dialogue.user_turns[0]}"
        assert all(u.startswith("Question") for u in users[1:])
        assert "An old answer." not in dialogue.answers
        assert dialogue.instruction_text in (dialogue.instruction.text(),
                                             dialogue.instruction.text(short=True))
    assert statistics["kept_turns"] == statistics["input_turns"] == 15


def test_build_data_rejects_with_checker(small_tokenizer, tmp_path, monkeypatch):
    _use_sampler(monkeypatch, ScriptedSampler(small_tokenizer, _well_or_plain, num_samples=2))
    config = _gatt_config(**{"instructions.kind_weights": {"starts_with": 1.0}})
    dialogues, _ = gatt.build_gatt_data(config, tmp_path, policy_init="unused",
                                        tokenizer=small_tokenizer, dialogues=MULTI_TURN)

    # The first sample never starts with "well", so the checker keeps the second.
    assert all(a.startswith("Well,") for d in dialogues for a in d.answers)


def test_build_data_stops_dialogue_when_all_rejected(small_tokenizer, tmp_path, monkeypatch):
    def respond(turn, user):
        return ["Plain.", "Plain too."] if turn == 2 else _well_or_plain(turn, user)

    _use_sampler(monkeypatch, ScriptedSampler(small_tokenizer, respond, num_samples=2))
    config = _gatt_config(**{"instructions.kind_weights": {"starts_with": 1.0}})
    dialogues, statistics = gatt.build_gatt_data(config, tmp_path, policy_init="unused",
                                                 tokenizer=small_tokenizer, dialogues=MULTI_TURN)

    assert [len(d.answers) for d in dialogues] == [1] * 5
    assert statistics["stop_reasons"] == {"complete": 0, "too_long": 0, "rejected": 5}
    assert statistics["kept_turns"] == 5


def test_build_data_without_checker_keeps_first(small_tokenizer, tmp_path, monkeypatch):
    _use_sampler(monkeypatch, ScriptedSampler(small_tokenizer, _well_or_plain, num_samples=2))
    config = _gatt_config(**{"instructions.kind_weights": {"starts_with": 1.0},
                             "rejection.use_checker": False})
    dialogues, _ = gatt.build_gatt_data(config, tmp_path, policy_init="unused",
                                        tokenizer=small_tokenizer, dialogues=MULTI_TURN)
    assert all(a.startswith("Plain") for d in dialogues for a in d.answers)


def test_build_data_resumes_from_shards(small_tokenizer, tmp_path, monkeypatch):
    _use_sampler(monkeypatch, ScriptedSampler(small_tokenizer, _well_or_plain, num_samples=2))
    config = _gatt_config()
    first, _ = gatt.build_gatt_data(config, tmp_path, policy_init="unused",
                                    tokenizer=small_tokenizer, dialogues=MULTI_TURN)
    shards = sorted((tmp_path / gatt.SHARDS_DIR).glob("shard_*.json"))
    assert len(shards) == 3  # 5 dialogues in shards of 2

    # A rerun reads every shard and samples nothing.
    def fail(*args, **kwargs):
        raise AssertionError("the rerun sampled again")

    monkeypatch.setattr(gatt, "make_sampler", fail)
    second, _ = gatt.build_gatt_data(config, tmp_path, policy_init="unused",
                                     tokenizer=small_tokenizer, dialogues=MULTI_TURN)
    assert second == first

    changed = _gatt_config(**{"sampling.temperature": 0.3})
    with pytest.raises(ValueError, match="other settings"):
        gatt.build_gatt_data(changed, tmp_path, policy_init="unused", tokenizer=small_tokenizer,
                             dialogues=MULTI_TURN)


def test_user_turns_of_inputs():
    world = synthetic.SyntheticWorld()
    [dialogue] = world.multi_turn_dialogues(1, 3, 3, seed=0)
    assert gatt.user_turns_of(dialogue) == [m.content for m in dialogue.messages[0::2]]
    with_system = [Message("system", "Be brief."), Message("user", "Hi")]
    assert gatt.user_turns_of(with_system) == ["Hi"]
    with pytest.raises(ValueError, match="no user message"):
        gatt.user_turns_of([Message("system", "Be brief.")])
    with pytest.raises(TypeError, match="chat.Message"):
        gatt.user_turns_of([{"role": "user", "content": "Hi"}])


def test_instruction_sft_dialogues_scope_one_turn():
    world = synthetic.SyntheticWorld()
    space = gatt.InstructionSpace.from_config(gatt_configs.get_config("tiny").instructions)
    dialogues = gatt.instruction_sft_dialogues(
        world, space, num_dialogues=40, min_turns=2, max_turns=6, instruction_probability=0.5,
        seed=0)
    checker = gatt.InstructionChecker()
    instructed = plain = 0
    for messages in dialogues:
        for user, answer in zip(messages[0::2], messages[1::2], strict=True):
            request = world.parse_request(user.content)
            ideal = world.ideal_answer(request)
            constraints = _parse_instruction(user.content, space)
            if constraints:
                instructed += 1
                instruction = gatt.Instruction(tuple(constraints))
                assert checker.follows_instruction(instruction, answer.content) in (True, None)
                assert answer.content == gatt.rewrite_to_follow(instruction, ideal)
            else:
                plain += 1
                assert answer.content == ideal
    # Expected: about half of the turns carry an instruction.
    assert 0.35 < instructed / (instructed + plain) < 0.65


def _parse_instruction(user_text, space):
    """Recover the constraints written in front of a user message, in either form."""
    found = []
    for kind in gatt.CONSTRAINT_KINDS:
        for value in space.values[kind] if kind in gatt.VALUE_FIELDS else ("",):
            constraint = gatt.Constraint(kind, value)
            if (user_text.find(constraint.text()) >= 0
                    or user_text.find(constraint.text(short=True)) >= 0):
                found.append(constraint)
    return found


# ---------------------------------------------------------------------------------------------
# Evaluation.


def test_evaluation_counts_following_per_turn(small_tokenizer):
    # The scripted model follows the instruction ("start with well") in turns 1 and 2 only.
    def respond(turn, user):
        return [f"Well, answer {turn}." if turn <= 2 else f"Answer {turn}."]

    sampler = ScriptedSampler(small_tokenizer, respond)
    dialogues = [gatt.EvalDialogue(WELL, tuple(f"Q{t}" for t in range(n))) for n in (2, 4, 5)]
    result = gatt.evaluate_following(sampler, None, small_tokenizer, dialogues,
                                     gatt.InstructionChecker(), placement="first_user",
                                     batch_size=2, max_prompt_length=4096)

    # Expected by counting: 3 dialogues answer turns 1-2, 2 reach turns 3-4, 1 reaches turn 5.
    assert [(e["turn"], e["dialogues"], e["followed"]) for e in result["per_turn"]] == [
        (1, 3, 3), (2, 3, 3), (3, 2, 0), (4, 2, 0), (5, 1, 0)]
    assert result["rate"] == pytest.approx(6 / 11)
    assert result["rate_turns_from_4"] == 0.0
    # Turns after the first: 1 + 3 + 4 answers, of which the three answers of turn 2 follow.
    assert result["per_instruction"] == {WELL.text(): {
        "dialogues": 3, "first_turn_rate": 1.0, "later_turns": 8, "later_turns_rate": 3 / 8}}
    # The instruction is only in the first user turn of every prompt.
    for prompt in sampler.prompts:
        turns = _user_turns(prompt)
        assert WELL.text() in turns[0]
        assert all(WELL.text() not in turn for turn in turns[1:])


def test_eval_dialogues_use_one_checkable_constraint():
    space = gatt.InstructionSpace.from_config(gatt_configs.get_config("7b").instructions)
    dialogues = [[Message("user", f"q{t}") for t in range(25)]] * 200
    checker = gatt.InstructionChecker()
    result = gatt.make_eval_dialogues(dialogues, space, checker, seed=0, max_turns=20)
    assert all(len(d.user_turns) == 20 for d in result)
    assert all(len(d.instruction.constraints) == 1 for d in result)
    assert all(checker.follows_instruction(d.instruction, "") is False for d in result)
    hobbies_only = gatt.InstructionSpace({"hobby": 1.0}, {"hobby": ("chess",)})
    with pytest.raises(ValueError, match="no checkable kind"):
        gatt.make_eval_dialogues(dialogues, hobbies_only, checker, seed=0)


def test_following_table_markdown():
    before = {"per_turn": [{"turn": 1, "dialogues": 2, "followed": 2, "rate": 1.0},
                           {"turn": 2, "dialogues": 2, "followed": 0, "rate": 0.0}],
              "rate": 0.5, "rate_turns_from_4": 0.0}
    after = {"per_turn": [{"turn": 1, "dialogues": 2, "followed": 2, "rate": 1.0},
                          {"turn": 2, "dialogues": 2, "followed": 1, "rate": 0.5}],
             "rate": 0.75, "rate_turns_from_4": 0.0}
    table = gatt.following_table_markdown(before, after).splitlines()
    assert table[2] == "| 1 | 2 | 100.0% (2/2) | 100.0% (2/2) |"
    assert table[3] == "| 2 | 2 | 0.0% (0/2) | 50.0% (1/2) |"
    assert table[-1] == "| all | | 50.0% | 75.0% |"


# ---------------------------------------------------------------------------------------------
# Configs and the end-to-end run.


@pytest.mark.parametrize("variant", gatt_configs.VARIANTS)
def test_config_variants_load(variant):
    config = gatt_configs.get_config(variant)
    assert config.variant == variant
    assert config.examples in gatt.EXAMPLE_MODES
    gatt.InstructionSpace.from_config(config.instructions)
    with pytest.raises(AttributeError):
        config.sampling.temprature = 1.0


def test_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match="Unknown Ghost Attention variant"):
        gatt_configs.get_config("1b")
    with pytest.raises(ValueError, match="options"):
        gatt_configs.get_config("tiny,fast")


def test_train_and_evaluate_tiny_smoke(tmp_path, monkeypatch):
    config = gatt_configs.get_config("tiny,smoke")
    result = gatt.train_and_evaluate(config, tmp_path)

    for name in ("report_file", "plot_file", "data_file"):
        assert (tmp_path / result[name]).is_file()
    assert load_model(result["model_dir"]).metadata["stage"] == "ghost_attention"
    assert result["before"]["per_turn"][0]["turn"] == 1
    assert "| turn | dialogues | before GAtt | after GAtt |" in (
        tmp_path / gatt.REPORT_FILE).read_text()
    records = [json.loads(line) for line in (tmp_path / gatt.DATA_FILE).read_text().splitlines()]
    assert len(records) == result["data"]["kept_dialogues"] > 0
    for record in records:
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users[0].startswith(record["instruction_text"])
        assert all(record["instruction_text"] not in user for user in users[1:])

    # A rerun finds every step done: no sampling, no training, same result.
    def fail(*args, **kwargs):
        raise AssertionError("the rerun repeated a finished step")

    monkeypatch.setattr(gatt.sft, "train_on_examples", fail)
    monkeypatch.setattr(gatt, "generate_dialogues", fail)
    assert gatt.train_and_evaluate(config, tmp_path) == result
