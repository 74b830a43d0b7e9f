"""Tests of reward, SFT and prompt batching and of the truncation policy."""

import logging

import numpy as np
import pytest

from llama_rlhf.data import batching
from llama_rlhf.data.chat import Message, encode_exchange, encode_for_training
from llama_rlhf.data.preferences import Comparison, PreferenceLevel
from llama_rlhf.data.tokenizer import load_tokenizer, train_sentencepiece

CORPUS = [
    f"[INST] Question {i}: where does the llama number {i} live? [/INST] "
    f"It lives on farm {i % 13} and eats grass, hay and {i % 5} apples. <<SYS>>"
    for i in range(300)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tokenizer") / "tiny"
    return train_sentencepiece(CORPUS, prefix, vocab_size=400)


def make_comparison(num_exchanges, *, system=None, answer_words=3, **fields):
    context = [Message("system", system)] if system else []
    for i in range(num_exchanges):
        context.append(Message("user", f"Question {i}: where does llama {i} live?"))
        context.append(Message("assistant", f"It lives on farm {i}."))
    context.append(Message("user", "And the last llama?"))
    return Comparison(
        context=tuple(context),
        chosen=" ".join(["grass"] * answer_words),
        rejected="It eats apples.",
        **fields,
    )


def dialog_ids(tokenizer, context, answer):
    return encode_for_training(tokenizer, [*context, Message("assistant", answer)])[0]


def test_pack_comparisons_shapes_and_padding(tokenizer):
    comparisons = [
        make_comparison(0, level=PreferenceLevel.BETTER, is_safety_prompt=True, chosen_safe=True),
        make_comparison(2, level=PreferenceLevel.UNKNOWN, rejected_safe=False),
    ]
    batch = batching.pack_comparisons(comparisons, tokenizer, max_length=128)

    assert batch["tokens"].shape == (2, 2, 128)
    assert batch["tokens"].dtype == np.int32
    assert batch["mask"].shape == (2, 2, 128)
    assert batch["mask"].dtype == bool
    assert batch["lengths"].dtype == np.int32
    np.testing.assert_array_equal(batch["level"], [1, 4])
    np.testing.assert_array_equal(batch["is_safety"], [True, False])
    np.testing.assert_array_equal(batch["safe"], [[1, -1], [-1, 0]])
    np.testing.assert_array_equal(batch["truncated"], [False, False])

    for row, comparison in enumerate(comparisons):
        for side, answer in enumerate((comparison.chosen, comparison.rejected)):
            # Expected ids: the chat encoding of context + answer, computed separately.
            expected = dialog_ids(tokenizer, comparison.context, answer)
            length = batch["lengths"][row, side]
            assert length == len(expected)
            assert batch["tokens"][row, side, :length].tolist() == expected
            assert batch["tokens"][row, side, length - 1] == tokenizer.eos_id
            assert (batch["tokens"][row, side, length:] == tokenizer.pad_id).all()
            assert batch["mask"][row, side].tolist() == [t < length for t in range(128)]


def test_truncation_drops_oldest_exchange_first(tokenizer, caplog):
    comparison = make_comparison(3)
    full = [
        dialog_ids(tokenizer, comparison.context, a)
        for a in (comparison.chosen, comparison.rejected)
    ]
    # Expected: both dialogs without their first exchange; chosen and rejected drop together.
    expected = [
        dialog_ids(tokenizer, comparison.context[2:], answer)
        for answer in (comparison.chosen, comparison.rejected)
    ]
    max_length = max(len(ids) for ids in expected)
    assert min(len(ids) for ids in full) > max_length

    with caplog.at_level(logging.INFO, logger="llama_rlhf.data.batching"):
        batch = batching.pack_comparisons([comparison], tokenizer, max_length=max_length)
    for side in (0, 1):
        length = batch["lengths"][0, side]
        assert batch["tokens"][0, side, :length].tolist() == expected[side]
    assert batch["truncated"].tolist() == [True]
    assert "Truncated 1 of 1 comparisons to max_length=" in caplog.text


def test_truncation_keeps_system_message(tokenizer):
    comparison = make_comparison(2, system="Answer like a farmer.")
    remaining = (comparison.context[0], *comparison.context[3:])
    expected = [
        dialog_ids(tokenizer, remaining, answer)
        for answer in (comparison.chosen, comparison.rejected)
    ]
    max_length = max(len(ids) for ids in expected)
    fitted = batching.fit_comparison(comparison, tokenizer, max_length=max_length)
    assert fitted.dropped_turns == 1
    assert fitted.chosen_ids == expected[0]
    assert fitted.rejected_ids == expected[1]
    assert fitted.cut_tokens is False


def test_overlong_final_exchange_keeps_bos_and_tail(tokenizer):
    comparison = make_comparison(1, answer_words=60)
    final_ids, label_start = encode_exchange(tokenizer, "And the last llama?", comparison.chosen)
    max_length = len(final_ids) - 5
    fitted = batching.fit_comparison(comparison, tokenizer, max_length=max_length)
    assert fitted.dropped_turns == 1
    assert fitted.cut_tokens is True
    assert len(fitted.chosen_ids) == max_length
    assert fitted.chosen_ids[0] == tokenizer.bos_id
    # The whole answer with its EOS survives; only the start of the prompt is gone.
    assert fitted.chosen_ids[-(len(final_ids) - label_start) :] == final_ids[label_start:]
    assert fitted.chosen_ids[1:] == final_ids[-(max_length - 1) :]
    # The rejected sequence fits after dropping the earlier exchange, so nothing is cut.
    assert fitted.rejected_ids == dialog_ids(tokenizer, comparison.context[2:], comparison.rejected)


def test_fit_comparison_rejects_tiny_max_length(tokenizer):
    with pytest.raises(ValueError, match="at least 2"):
        batching.fit_comparison(make_comparison(0), tokenizer, max_length=1)


def test_truncation_invariants_on_shared_pairs(shared):
    from llama_rlhf.data.hh_rlhf import read_hh_rlhf_jsonl

    llama = load_tokenizer(shared / "models/llama2-tokenizer/tokenizer.model")
    pairs = read_hh_rlhf_jsonl(
        shared / "data/hh-rlhf/harmless-base-2000.jsonl.gz",
        subset="harmless-base",
        skip_invalid=True,
    )
    num_truncated = 0
    for comparison in pairs[:600]:
        fitted = batching.fit_comparison(comparison, llama, max_length=512)
        num_truncated += fitted.truncated
        for ids, answer in (
            (fitted.chosen_ids, comparison.chosen),
            (fitted.rejected_ids, comparison.rejected),
        ):
            assert len(ids) <= 512
            assert ids[0] == llama.bos_id
            assert ids[-1] == llama.eos_id
            final_ids, label_start = encode_exchange(llama, comparison.context[-1].content, answer)
            answer_ids = final_ids[label_start:]
            if len(answer_ids) < 511:
                assert ids[-len(answer_ids) :] == answer_ids
    # Some of these pairs are longer than 512 tokens, so the policy was exercised.
    assert num_truncated > 0


def test_pack_sft_keeps_eos_label_with_eos_padding():
    eos = 2
    examples = [([1, 10, 11, 12, eos], [0, 0, 1, 1, 1]), ([1, 20, eos], [0, 1, 1])]
    batch = batching.pack_sft(examples, max_length=6, pad_id=eos)
    assert batch["tokens"].tolist() == [[1, 10, 11, 12, 2, 2], [1, 20, 2, 2, 2, 2]]
    assert batch["mask"].tolist() == [
        [True, True, True, True, True, False],
        [True, True, True, False, False, False],
    ]
    # The EOS at the end of each answer is a target; the padding with the same id is not.
    assert batch["loss_mask"].tolist() == [
        [False, False, True, True, True, False],
        [False, True, True, False, False, False],
    ]
    assert batch["tokens"].dtype == np.int32


def test_pack_sft_too_long_raises_or_cuts(caplog):
    examples = [([1, 5, 6, 7, 2], [0, 1, 1, 1, 1])]
    with pytest.raises(ValueError, match="example 0 has 5 tokens, more than max_length=3"):
        batching.pack_sft(examples, max_length=3, pad_id=2)
    with caplog.at_level(logging.INFO, logger="llama_rlhf.data.batching"):
        batch = batching.pack_sft(examples, max_length=3, pad_id=2, truncate=True)
    assert batch["tokens"].tolist() == [[1, 5, 6]]
    assert batch["loss_mask"].tolist() == [[False, True, True]]
    assert "Cut 1 of 1 SFT examples" in caplog.text


def test_pack_sft_mismatched_mask_raises():
    with pytest.raises(ValueError, match="example 0 has 3 ids but a loss mask of length 2"):
        batching.pack_sft([([1, 2, 3], [0, 1])], max_length=4, pad_id=0)


def test_pack_sft_from_chat_encoding(tokenizer):
    dialog = [Message("user", "Where does llama 3 live?"), Message("assistant", "On farm 3.")]
    ids, loss_mask = encode_for_training(tokenizer, dialog)
    batch = batching.pack_sft([(ids, loss_mask)], max_length=64, pad_id=tokenizer.pad_id)
    assert batch["tokens"][0, : len(ids)].tolist() == ids
    assert batch["loss_mask"][0].sum() == sum(loss_mask)


def test_left_pad_aligns_prompts_right():
    batch = batching.left_pad([[1, 5, 6], [1, 7]], length=4, pad_id=0)
    assert batch["tokens"].tolist() == [[0, 1, 5, 6], [0, 0, 1, 7]]
    assert batch["mask"].tolist() == [[False, True, True, True], [False, False, True, True]]
    assert batch["tokens"].dtype == np.int32


@pytest.mark.parametrize("prompt", [[], [1, 2, 3, 4, 5]])
def test_left_pad_rejects_empty_or_long_prompts(prompt):
    with pytest.raises(ValueError, match="expected between 1 and length=4"):
        batching.left_pad([[1], prompt], length=4, pad_id=0)
