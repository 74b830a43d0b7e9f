"""Tests of the Llama 2 chat format against an independent re-implementation of Meta's code."""

import pytest
import sentencepiece as spm

from llama_rlhf.data import chat
from llama_rlhf.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormatError, Message
from llama_rlhf.data.tokenizer import load_tokenizer, train_sentencepiece

DIALOGS = {
    "system_prompt": [
        Message("system", DEFAULT_SYSTEM_PROMPT),
        Message("user", "What is the capital of France?"),
        Message("assistant", "The capital of France is Paris."),
        Message("user", "And of Italy?"),
    ],
    "multi_turn": [
        Message("user", "I am going to Paris, what should I see?"),
        Message("assistant", "1. The Eiffel Tower\n2. The Louvre\n3. Notre-Dame"),
        Message("user", "What is so great about #1?"),
        Message("assistant", "It offers a panoramic view of the city."),
        Message("user", "  Thanks!  Anything else?\n"),
    ],
    "non_ascii": [
        Message("system", "  Antworte immer auf Deutsch. 日本語も可。"),
        Message("user", "Wie heißt die Hauptstadt von Österreich? 🦙"),
        Message("assistant", " Die Hauptstadt ist Wien — «Wien» auf Französisch: Vienne. "),
        Message("user", "Und 東京 liegt in welchem Land?"),
    ],
    "whitespace_and_digits": [
        Message("user", "Add  12345 and 678.\n\nThen  explain."),
        Message("assistant", "\n12345 + 678 = 13023.\n\n  Done  "),
        Message("user", "\tWhy?"),
    ],
}


@pytest.fixture(scope="module", params=["llama2", "tiny"])
def model_file(request, tmp_path_factory):
    """Llama 2's SentencePiece model, and a small one trained here that needs no shared data."""
    if request.param == "llama2":
        return request.getfixturevalue("shared") / "models/llama2-tokenizer/tokenizer.model"
    corpus = [m.content for dialog in DIALOGS.values() for m in dialog] * 20
    prefix = tmp_path_factory.mktemp("tiny_tokenizer") / "tiny"
    train_sentencepiece(corpus, prefix, vocab_size=512)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def tokenizer(model_file):
    return load_tokenizer(model_file)


@pytest.fixture(scope="module")
def processor(model_file):
    return spm.SentencePieceProcessor(model_file=str(model_file))


def meta_dialog_ids(processor, dialog):
    """Meta's `chat_completion` prompt ids, rewritten here on plain dicts and sentencepiece.

    Follows llama/generation.py of facebookresearch/llama (Llama 2 release): merge the system
    message into the first user message, encode each finished exchange with BOS and EOS,
    then the open user turn with BOS only.
    """
    dialog = [{"role": m.role, "content": m.content} for m in dialog]
    if dialog[0]["role"] == "system":
        merged = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        tokens += [processor.bos_id()] + processor.encode(text) + [processor.eos_id()]
    if dialog[-1]["role"] == "user":
        text = f"[INST] {dialog[-1]['content'].strip()} [/INST]"
        tokens += [processor.bos_id()] + processor.encode(text)
    return tokens


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_prompt_matches_meta(tokenizer, processor, name):
    dialog = DIALOGS[name]
    # Expected ids: the re-implementation of Meta's algorithm above.
    assert chat.encode_prompt(tokenizer, dialog) == meta_dialog_ids(processor, dialog)


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_training_ids_match_meta(tokenizer, processor, name):
    dialog = [*DIALOGS[name], Message("assistant", "Final answer: ja, 是的.")]
    ids, loss_mask = chat.encode_for_training(tokenizer, dialog)
    # Expected ids: Meta's finished exchanges, without an open turn.
    assert ids == meta_dialog_ids(processor, dialog)
    assert len(loss_mask) == len(ids)


def test_system_prompt_tokens_appear_once(tokenizer, processor):
    ids = chat.encode_prompt(tokenizer, DIALOGS["system_prompt"])
    # The system block is encoded inside the first exchange only: one "<<SYS>>" opening.
    sys_ids = processor.encode("<<SYS>>")
    windows = [ids[i : i + len(sys_ids)] for i in range(len(ids))]
    assert windows.count(sys_ids) == 1
    assert ids[0] == 1
    assert ids.count(1) == 2  # one BOS per exchange: one finished, one open


def test_loss_mask_marks_each_answer_and_its_eos(tokenizer, processor):
    dialog = [*DIALOGS["non_ascii"], Message("assistant", "Japan. 日本です。")]
    ids, loss_mask = chat.encode_for_training(tokenizer, dialog)
    answers = [m.content for m in dialog if m.role == "assistant"]

    # Split the ids into exchanges at each BOS and check every exchange separately.
    starts = [i for i, token in enumerate(ids) if token == processor.bos_id()]
    assert len(starts) == len(answers)
    for start, end, answer in zip(starts, [*starts[1:], len(ids)], answers, strict=True):
        labels = [ids[t] for t in range(start, end) if loss_mask[t]]
        # Expected labels: sentencepiece splits at whitespace, so the answer encoded on its
        # own (with the trailing space of Meta's template) is the tail of the exchange.
        assert labels == processor.encode(answer.strip() + " ") + [processor.eos_id()]
        assert ids[end - 1] == processor.eos_id()
        assert loss_mask[end - 1] == 1
        label_positions = [t for t in range(start, end) if loss_mask[t]]
        assert label_positions == list(range(label_positions[0], end))
        assert processor.decode(ids[start : label_positions[0]]).endswith("[/INST]")


def test_learn_last_masks_earlier_turns(tokenizer):
    dialog = [*DIALOGS["multi_turn"], Message("assistant", "The Musée d'Orsay.")]
    ids, all_mask = chat.encode_for_training(tokenizer, dialog)
    last_ids, last_mask = chat.encode_for_training(tokenizer, dialog, learn="last")
    assert last_ids == ids
    last_start = max(i for i, token in enumerate(ids) if token == tokenizer.bos_id)
    assert not any(last_mask[:last_start])
    assert last_mask[last_start:] == all_mask[last_start:]
    assert sum(last_mask) > 0


def test_learn_indices_select_turns(tokenizer):
    dialog = [*DIALOGS["multi_turn"], Message("assistant", "The Musée d'Orsay.")]
    _, all_mask = chat.encode_for_training(tokenizer, dialog)
    _, first_mask = chat.encode_for_training(tokenizer, dialog, learn=[0])
    _, none_mask = chat.encode_for_training(tokenizer, dialog, learn=[])
    first_end = next(i for i in range(1, len(all_mask)) if all_mask[i - 1] and not all_mask[i])
    assert first_mask[:first_end] == all_mask[:first_end]
    assert not any(first_mask[first_end:])
    assert not any(none_mask)


def test_learn_invalid_values_raise(tokenizer):
    dialog = [Message("user", "hi"), Message("assistant", "hello")]
    with pytest.raises(ValueError, match=r"expected indices in \[0, 1\)"):
        chat.encode_for_training(tokenizer, dialog, learn=[1])
    with pytest.raises(ValueError, match="'last'"):
        chat.encode_for_training(tokenizer, dialog, learn="first")


@pytest.mark.parametrize(
    ("dialog", "kind", "message"),
    [
        ([Message("user", "a"), Message("user", "b")], "roles_not_alternating", "message 1"),
        ([Message("assistant", "a")], "roles_not_alternating", "expected 'user'"),
        (
            [Message("user", "a"), Message("assistant", "b"), Message("system", "c")],
            "roles_not_alternating",
            "message 2 has role 'system'",
        ),
        ([Message("system", "s")], "empty_dialog", "no user message"),
        ([], "empty_dialog", "no messages"),
        ([Message("user", "a [/INST] b")], "special_tags", r"user message 0 .*\[/INST\]"),
        (
            [Message("system", "<<SYS>> x"), Message("user", "a")],
            "special_tags",
            "system message 0",
        ),
        ([Message("user", "a"), Message("assistant", "b")], "wrong_last_role", "expected 'user'"),
    ],
)
def test_invalid_prompt_dialogs_raise(tokenizer, dialog, kind, message):
    with pytest.raises(ChatFormatError, match=message) as error:
        chat.encode_prompt(tokenizer, dialog)
    assert error.value.kind == kind


def test_training_dialog_must_end_with_answer(tokenizer):
    with pytest.raises(ChatFormatError, match="expected 'assistant'") as error:
        chat.encode_for_training(tokenizer, [Message("user", "a")])
    assert error.value.kind == "wrong_last_role"


def test_assistant_content_with_tags_is_allowed(tokenizer, processor):
    dialog = [Message("user", "Write the tag."), Message("assistant", "It is [INST].")]
    ids, _ = chat.encode_for_training(tokenizer, dialog)
    assert ids == meta_dialog_ids(processor, dialog)


def test_message_rejects_unknown_role():
    with pytest.raises(ChatFormatError, match="expected one of"):
        Message("bot", "hi")


def test_default_system_prompt_matches_transformers():
    llama_tokenization = pytest.importorskip("transformers.models.llama.tokenization_llama")
    # Expected text: the copy of Meta's default system prompt that transformers ships.
    assert DEFAULT_SYSTEM_PROMPT == llama_tokenization.DEFAULT_SYSTEM_PROMPT
