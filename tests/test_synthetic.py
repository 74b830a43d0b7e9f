"""Tests of the synthetic world: facts, prompts, demonstrations, dialogues and its tokenizer."""

import collections
import socket

import numpy as np
import pytest

from llama_rlhf.data.chat import Message, encode_for_training, encode_prompt, validate_dialog
from llama_rlhf.data.synthetic import (
    ANIMAL_POOL,
    BARE_REFUSALS,
    HARM_WORDS,
    HELPFUL_KINDS,
    HELPFUL_QUALITIES,
    HELPFUL_TEMPLATES,
    INSTRUCTIONS,
    NUMBER_WORDS,
    RUDE_WORDS,
    SAFETY_KINDS,
    SAFETY_QUALITIES,
    SAFETY_TEMPLATES,
    Request,
    SyntheticWorld,
    apply_instruction,
    build_tokenizer,
    find_instructions,
    follows_instruction,
    words_of,
)

WORLD = SyntheticWorld(seed=0)


def test_world_facts_depend_on_seed():
    assert SyntheticWorld(0).facts_table() == WORLD.facts_table()
    assert SyntheticWorld(1).facts_table() != WORLD.facts_table()
    assert len(SyntheticWorld(2, num_animals=12).animals) == 12


def test_world_facts_are_consistent():
    facts = WORLD.facts_table()
    assert len(facts) == 8
    # Legs and sound are fixed per species in ANIMAL_POOL; sizes are a ranking.
    for row in facts:
        assert (row["legs"], row["sound"]) == ANIMAL_POOL[row["name"]]
    assert sorted(row["size"] for row in facts) == list(range(8))
    # Every habitat and food the world lists belongs to at least one animal.
    assert set(WORLD.habitats) == {row["habitat"] for row in facts}
    assert set(WORLD.foods) == {row["food"] for row in facts}


@pytest.mark.parametrize(
    "kwargs",
    [{"num_animals": 1}, {"num_animals": 17}, {"num_animals": 3.0}, {"seed": -1}],
)
def test_world_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticWorld(**kwargs)


def test_prompts_are_seeded():
    first = WORLD.prompts(30, seed=3)
    assert first == WORLD.prompts(30, seed=3)
    assert first != WORLD.prompts(30, seed=4)
    # Other calls in between do not change the result.
    WORLD.sft_dialogues(5)
    assert first == WORLD.prompts(30, seed=3)


def test_prompts_safety_fraction_and_tags():
    prompts = WORLD.prompts(40, safety_fraction=0.25, seed=1)
    assert len(prompts) == 40
    # round(40 * 0.25) = 10 safety prompts, exactly.
    assert sum(p.is_safety_prompt for p in prompts) == 10
    for prompt in prompts:
        assert prompt.is_safety_prompt == (prompt.request.kind in SAFETY_KINDS)
        assert prompt.messages[-1].role == "user"
        assert WORLD.parse_request(prompt.text) == prompt.request
    assert not any(p.is_safety_prompt for p in WORLD.prompts(20, safety_fraction=0.0))
    assert all(p.is_safety_prompt for p in WORLD.prompts(20, safety_fraction=1.0))


def test_prompts_instruction_fraction():
    with_instruction = WORLD.prompts(20, seed=2, instruction_fraction=1.0)
    for prompt in with_instruction:
        assert prompt.text.startswith(INSTRUCTIONS[prompt.instruction])
        assert find_instructions(prompt.messages) == [prompt.instruction]
    assert all(p.instruction is None for p in WORLD.prompts(20, seed=2))


@pytest.mark.parametrize(
    "kwargs",
    [{"n": -1}, {"n": 3, "safety_fraction": 1.5}, {"n": 3, "instruction_fraction": -0.1}],
)
def test_prompts_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        WORLD.prompts(**kwargs)


def test_parse_request_inverts_every_template():
    templates = {**HELPFUL_TEMPLATES, **SAFETY_TEMPLATES}
    for request in WORLD.requests():
        for index in range(len(templates[request.kind])):
            text = WORLD.prompt_text(request, index)
            assert WORLD.parse_request(text) == request, text
            assert WORLD.parse_request(text.upper()) == request, text
            prefixed = f"{INSTRUCTIONS['pirate']} {text}"
            assert WORLD.parse_request(prefixed) == request, prefixed


def test_parse_request_rejects_foreign_text():
    absent = next(name for name in ANIMAL_POOL if name not in WORLD.animals)
    present = WORLD.animal_names[0]
    for text in (
        "What colour is the unicorn?",
        f"What colour is the {absent}?",
        f"Which is bigger, the {present} or the {present}?",
        "Count from five to two.",
        "Count from five to five.",
        "How do I break into the castle?",
        "Hello there.",
        "",
    ):
        assert WORLD.parse_request(text) is None, text


def test_parse_request_takes_the_last_question():
    a, b = WORLD.animal_names[:2]
    text = f"What colour is the {a}? What colour is the {b}?"
    assert WORLD.parse_request(text) == Request("colour", animal=b)


def test_requests_cover_kinds():
    kinds = {request.kind for request in WORLD.requests()}
    assert kinds == set(HELPFUL_KINDS) | set(SAFETY_KINDS)
    with pytest.raises(ValueError, match="unknown request kind"):
        WORLD.requests("weather")


def test_ideal_answers_state_true_facts():
    # Expected facts come from plain loops over the facts table.
    table = {row["name"]: row for row in WORLD.facts_table()}
    for name, row in table.items():
        for kind in ("colour", "habitat", "food", "legs", "sound"):
            answer = WORLD.ideal_answer(Request(kind, animal=name))
            assert set(words_of(answer)) >= {name, row[kind]}, answer
        describe = set(words_of(WORLD.ideal_answer(Request("describe", animal=name))))
        assert describe >= {name, row["colour"], row["habitat"], row["food"]}
    for habitat in WORLD.habitats:
        expected = {name for name, row in table.items() if row["habitat"] == habitat}
        answer = WORLD.ideal_answer(Request("list_habitat", habitat=habitat))
        assert set(words_of(answer)) & set(ANIMAL_POOL) == expected, answer
    for food in WORLD.foods:
        expected = {name for name, row in table.items() if row["food"] == food}
        answer = WORLD.ideal_answer(Request("list_food", food=food))
        assert set(words_of(answer)) & set(ANIMAL_POOL) == expected, answer
    a, b = WORLD.animal_names[:2]
    big, small = (a, b) if table[a]["size"] > table[b]["size"] else (b, a)
    assert WORLD.ideal_answer(Request("bigger", animal=a, other=b)) == (
        f"The {big} is bigger than the {small}."
    )
    assert WORLD.ideal_answer(Request("is_bigger", animal=small, other=big)).startswith("No,")
    assert WORLD.ideal_answer(Request("count", start=3, stop=6)) == "Three, four, five, six."


def test_ideal_refusals_give_reason_and_alternative():
    for request in WORLD.requests():
        if not request.is_safety:
            continue
        answer = WORLD.ideal_answer(request)
        assert answer.startswith("I can't help you"), answer
        assert "instead" in words_of(answer)
        assert not set(words_of(answer)) & HARM_WORDS


def test_sft_dialogues_quality_mix():
    demos = WORLD.sft_dialogues(4000, safety_fraction=0.25, seed=0)
    assert sum(d.is_safety_prompt for d in demos) == 1000
    for is_safety, weights in ((False, HELPFUL_QUALITIES), (True, SAFETY_QUALITIES)):
        counts = collections.Counter(d.quality for d in demos if d.is_safety_prompt == is_safety)
        total = sum(counts.values())
        assert set(counts) == set(weights)
        for quality, weight in weights.items():
            # Binomial standard deviation is at most 0.016 for 1000 draws.
            assert abs(counts[quality] / total - weight) < 0.05, (quality, counts)


def test_sft_answers_match_their_quality():
    rng_free = WORLD.sft_dialogues(600, seed=5, instruction_fraction=0.3)
    for demo in rng_free:
        user, assistant = demo.messages
        assert (user.role, assistant.role) == ("user", "assistant")
        words = set(words_of(assistant.content))
        ideal = WORLD.ideal_answer(demo.request, demo.instruction)
        if demo.quality == "ideal":
            assert assistant.content == ideal
        elif demo.quality == "unsafe":
            assert words & HARM_WORDS, assistant.content
        elif demo.quality == "rude":
            assert words & RUDE_WORDS, assistant.content
        elif demo.quality in ("false_refusal", "bare_refusal"):
            assert assistant.content in BARE_REFUSALS
        elif demo.quality in ("partial", "off_topic"):
            assert assistant.content != WORLD.ideal_answer(demo.request)
        elif demo.quality == "verbose":
            assert len(words_of(assistant.content)) > len(words_of(ideal))
        if demo.quality != "unsafe":
            assert not words & HARM_WORDS, assistant.content


def test_sft_dialogues_custom_weights():
    demos = WORLD.sft_dialogues(
        50, helpful_qualities={"ideal": 1.0}, safety_qualities={"unsafe": 1}
    )
    assert {d.quality for d in demos if not d.is_safety_prompt} == {"ideal"}
    assert {d.quality for d in demos if d.is_safety_prompt} == {"unsafe"}
    with pytest.raises(ValueError, match="unknown qualities"):
        WORLD.sft_dialogues(5, helpful_qualities={"great": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        WORLD.sft_dialogues(5, safety_qualities={"ideal": 0.0})


def test_answer_rejects_quality_of_other_prompt_type():
    request = WORLD.requests("hurt")[0]
    with pytest.raises(ValueError, match="not valid"):
        WORLD.answer(request, "verbose", np.random.default_rng(0))


def test_multi_turn_dialogues():
    dialogues = WORLD.multi_turn_dialogues(30, min_turns=2, max_turns=20, seed=1)
    assert dialogues == WORLD.multi_turn_dialogues(30, min_turns=2, max_turns=20, seed=1)
    turns = [d.num_turns for d in dialogues]
    assert min(turns) >= 2
    assert max(turns) <= 20
    assert len(set(turns)) > 5
    for dialogue in dialogues:
        validate_dialog(dialogue.messages, last_role="assistant")
        assert len(dialogue.requests) == dialogue.num_turns
        for message in dialogue.messages[1::2]:
            assert follows_instruction(dialogue.instruction, message.content), message
        for message, request in zip(dialogue.messages[0::2], dialogue.requests, strict=True):
            assert WORLD.parse_request(message.content) == request


def test_dialogue_with_instruction():
    dialogue = WORLD.multi_turn_dialogues(1, min_turns=3, max_turns=3, seed=0)[0]
    text = dialogue.instruction_text
    first = dialogue.with_instruction("first")
    assert first[0].content == f"{text} {dialogue.messages[0].content}"
    assert [m.content for m in first[1:]] == [m.content for m in dialogue.messages[1:]]
    every = dialogue.with_instruction("all")
    assert all(m.content.startswith(text) for m in every if m.role == "user")
    assert not any(m.content.startswith(text) for m in every if m.role == "assistant")
    system = dialogue.with_instruction("system")
    assert system[0] == Message("system", text)
    assert system[1:] == dialogue.messages
    for messages in (first, every, system):
        assert find_instructions(messages) == [dialogue.instruction]
    with pytest.raises(ValueError, match="expected 'first'"):
        dialogue.with_instruction("last")


@pytest.mark.parametrize(
    "kwargs", [{"min_turns": 0}, {"min_turns": 5, "max_turns": 4}, {"max_turns": 2.5}]
)
def test_multi_turn_dialogues_reject_bad_turns(kwargs):
    with pytest.raises(ValueError):
        WORLD.multi_turn_dialogues(2, **kwargs)


@pytest.mark.parametrize(
    "instruction, answer, follows",
    [
        ("end_friend", "The fox is red, friend.", True),
        ("end_friend", "Friend, the fox is red.", False),
        ("end_goodbye", "The fox is red. Goodbye!", True),
        ("start_well", "Well, the fox is red.", True),
        ("start_well", "The fox is red, well.", False),
        ("pirate", "Arr, I can't help with that.", True),
        ("lower_case", "the fox is red.", True),
        ("lower_case", "The fox is red.", False),
        ("lower_case", "", False),
    ],
)
def test_follows_instruction_cases(instruction, answer, follows):
    assert follows_instruction(instruction, answer) is follows


def test_apply_instruction_cases():
    assert apply_instruction("end_friend", "The fox is red.") == "The fox is red, friend."
    assert apply_instruction("start_well", "The fox is red.") == "Well, the fox is red."
    assert apply_instruction("pirate", "I can't help.") == "Arr, I can't help."
    assert apply_instruction("lower_case", "The Fox.") == "the fox."
    for name in INSTRUCTIONS:
        assert follows_instruction(name, apply_instruction(name, "Six, seven, eight."))
    with pytest.raises(KeyError, match="unknown instruction"):
        apply_instruction("shout", "The fox is red.")


def test_reference_texts_are_deterministic():
    texts = WORLD.reference_texts()
    assert texts == SyntheticWorld(0).reference_texts()
    assert texts == sorted(set(texts))
    # A small vocabulary is what lets a tiny model become fluent quickly.
    assert len(WORLD.vocabulary()) < 300
    assert set(NUMBER_WORDS) <= WORLD.vocabulary()


def test_tokenizer_builds_offline_and_caches(tmp_path, monkeypatch):
    def refuse_connection(*args, **kwargs):
        raise AssertionError("build_tokenizer must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    tokenizer = build_tokenizer(tmp_path / "a", vocab_size=768, world=WORLD)
    assert tokenizer.vocab_size == 768
    model_files = list((tmp_path / "a" / "tokenizer").glob("*.model"))
    assert [str(f) for f in model_files] == [tokenizer.source]
    modified = model_files[0].stat().st_mtime_ns

    again = build_tokenizer(tmp_path / "a", vocab_size=768, world=WORLD)
    assert again.source == tokenizer.source
    assert model_files[0].stat().st_mtime_ns == modified

    # Training is deterministic: another workdir gets the same bytes.
    other = build_tokenizer(tmp_path / "b", vocab_size=768, world=SyntheticWorld(0))
    assert open(other.source, "rb").read() == open(tokenizer.source, "rb").read()
    # Another world or vocabulary size trains another model.
    assert build_tokenizer(tmp_path / "a", 768, world=SyntheticWorld(1)).source != tokenizer.source
    assert build_tokenizer(tmp_path / "a", 600, world=WORLD).vocab_size == 600


def test_tokenizer_round_trips_world_texts(tmp_path):
    tokenizer = build_tokenizer(tmp_path, world=WORLD)
    sample = WORLD.sft_dialogues(20, seed=9, instruction_fraction=0.5)
    for demo in sample:
        for message in demo.messages:
            ids = tokenizer.encode(message.content)
            assert tokenizer.decode(ids) == message.content
            # Every world text is covered by learned pieces, without byte fallback.
            assert not any(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)
        ids, loss_mask = encode_for_training(tokenizer, demo.messages)
        labels = [i for i, m in zip(ids, loss_mask, strict=True) if m]
        assert tokenizer.decode(labels).strip() == demo.messages[1].content
        assert encode_prompt(tokenizer, demo.messages[:1]) == ids[: loss_mask.index(1)]
