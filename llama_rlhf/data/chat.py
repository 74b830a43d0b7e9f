"""The Llama 2 chat format, token for token as Meta's reference `chat_completion` builds it.

A dialog is an optional system message followed by user and assistant messages that
alternate, starting with the user. Meta's algorithm (llama/generation.py in
facebookresearch/llama, July 2023):

  1. A leading system message is merged into the first user message as
     "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}".
  2. Each finished exchange is encoded on its own as
     BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " + EOS.
  3. An open final user turn is encoded as BOS + "[INST] {user.strip()} [/INST]".
  4. The id lists are concatenated.

Step 1 merges before stripping, so leading whitespace of the system prompt and of the first
user message survives, as in Meta's code. The encoders here reject user or system content
that contains one of the tags "[INST]", "[/INST]", "<<SYS>>" or "<</SYS>>", because such
content could forge turns. Meta's code returns an error message for such dialogs instead of a
generation, and it also checks assistant content, which this module does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from llama_rlhf.data.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

ROLES = ("system", "user", "assistant")

# Meta's default Llama 2 system prompt, which early versions of llama/generation.py in
# facebookresearch/llama defined. transformers 5.25 keeps the same text in
# models/llama/tokenization_llama.py. Some chat front-ends put two spaces after "safe.".
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses "
    "are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead "
    "of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)


class ChatFormatError(ValueError):
    """A dialog that the Llama 2 chat format cannot encode.

    Attributes:
        kind: Short name of the broken rule, such as "roles_not_alternating" or
            "special_tags", for counting skipped records.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn of a dialog.

    Attributes:
        role: "system", "user" or "assistant".
        content: The text of the turn.
    """

    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ChatFormatError(
                "invalid_role", f"message role is {self.role!r}, expected one of {ROLES}"
            )
        if not isinstance(self.content, str):
            raise ChatFormatError(
                "invalid_content",
                f"{self.role} message content is a {type(self.content).__name__}, expected str",
            )


def find_special_tag(text: str) -> str | None:
    """Return the first chat-format tag found in `text`, or None."""
    for tag in SPECIAL_TAGS:
        if tag in text:
            return tag
    return None


def validate_dialog(messages: Sequence[Message], *, last_role: str | None = None) -> None:
    """Raise ChatFormatError unless `messages` is a dialog that Meta's format can encode.

    Rules: an optional system message first, then user and assistant messages alternating,
    starting with a user message. User and system content must not contain any of
    `SPECIAL_TAGS`.

    Args:
        messages: The dialog.
        last_role: When given, the role the final message must have ("user" for a prompt to
            generate from, "assistant" for a training example).
    """
    if not messages:
        raise ChatFormatError("empty_dialog", "dialog has no messages")
    for index, message in enumerate(messages):
        if not isinstance(message, Message):
            raise ChatFormatError(
                "invalid_message",
                f"message {index} is a {type(message).__name__}, expected chat.Message",
            )

    offset = 1 if messages[0].role == "system" else 0
    if len(messages) == offset:
        raise ChatFormatError("empty_dialog", "dialog has a system message but no user message")
    for index, message in enumerate(messages[offset:], start=offset):
        expected = "user" if (index - offset) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ChatFormatError(
                "roles_not_alternating",
                f"message {index} has role {message.role!r}, expected {expected!r}: after an "
                "optional leading system message, roles must alternate user/assistant",
            )
    for index, message in enumerate(messages):
        if message.role in ("system", "user"):
            tag = find_special_tag(message.content)
            if tag is not None:
                raise ChatFormatError(
                    "special_tags",
                    f"{message.role} message {index} contains the chat-format tag {tag!r}, "
                    f"which is not allowed in {message.role} content",
                )

    if last_role is not None and messages[-1].role != last_role:
        raise ChatFormatError(
            "wrong_last_role",
            f"the last message has role {messages[-1].role!r}, expected {last_role!r}",
        )


def _user_turns_and_answers(messages: Sequence[Message]) -> tuple[list[str], list[str]]:
    """Split a validated dialog into user texts (system prompt merged) and assistant texts."""
    if messages[0].role == "system":
        merged_first = B_SYS + messages[0].content + E_SYS + messages[1].content
        rest = [Message("user", merged_first), *messages[2:]]
    else:
        rest = list(messages)
    user_texts = [m.content for m in rest[0::2]]
    answers = [m.content for m in rest[1::2]]
    return user_texts, answers


def _open_turn_text(user_text: str) -> str:
    return f"{B_INST} {user_text.strip()} {E_INST}"


def _exchange_text(user_text: str, answer: str) -> str:
    return f"{B_INST} {user_text.strip()} {E_INST} {answer.strip()} "


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Encode a dialog that ends with a user message, for generating the next answer.

    Returns:
        The ids of all finished exchanges followed by BOS + "[INST] {user} [/INST]".
    """
    validate_dialog(messages, last_role="user")
    user_texts, answers = _user_turns_and_answers(messages)
    ids: list[int] = []
    # One user text more than answers: the last user turn is still open.
    for user_text, answer in zip(user_texts, answers, strict=False):
        ids += tokenizer.encode(_exchange_text(user_text, answer), bos=True, eos=True)
    ids += tokenizer.encode(_open_turn_text(user_texts[-1]), bos=True)
    return ids


def encode_exchange(tokenizer: Tokenizer, user_text: str, answer: str) -> tuple[list[int], int]:
    """Encode one finished exchange and find where its answer labels start.

    The label tokens are the ids of the exchange minus the ids of the open turn that Meta's
    `chat_completion` would feed the model to generate this answer, i.e.
    `encode(BOS + "[INST] {user} [/INST] {answer} " + EOS)` minus
    `encode(BOS + "[INST] {user} [/INST]")`. The space after "[/INST]" therefore belongs to
    the answer: with Llama 2's tokenizer it is the "▁" that starts the answer's first piece,
    which is exactly what the model generates after the prompt. The trailing " " and EOS are
    labels too, so the model learns to stop.

    Returns:
        `(ids, label_start)`: ids[label_start:] are the answer's label tokens.

    Raises:
        ChatFormatError: If the open-turn ids are not a prefix of the exchange ids. This does
            not happen with SentencePiece models that split at whitespace, as Llama 2's does.
    """
    ids = tokenizer.encode(_exchange_text(user_text, answer), bos=True, eos=True)
    prompt_ids = tokenizer.encode(_open_turn_text(user_text), bos=True)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ChatFormatError(
            "prefix_mismatch",
            f"the tokenizer {tokenizer.source} encodes the prompt part of an exchange "
            f"differently inside the exchange ({ids[: len(prompt_ids)]}) than alone "
            f"({prompt_ids}), so the answer's label tokens are not well defined",
        )
    return ids, len(prompt_ids)


def encode_for_training(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    learn: str | Collection[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Encode a dialog that ends with an assistant message, with a loss mask of its answers.

    The ids equal Meta's `chat_completion` ids for the dialog's finished exchanges (no open
    turn). The loss mask marks the label tokens of the selected answers; see
    `encode_exchange` for which tokens those are.

    Args:
        tokenizer: The tokenizer.
        messages: The dialog, ending with an assistant message.
        learn: Which assistant turns are labels: None or "all" for every turn, "last" for
            only the final turn (as Ghost Attention needs), or a collection of 0-based
            assistant-turn indices.

    Returns:
        `(ids, loss_mask)`, equally long; loss_mask[t] == 1 when ids[t] is a target token.
        Each answer's EOS is a target even though padding may reuse the EOS id.
    """
    validate_dialog(messages, last_role="assistant")
    user_texts, answers = _user_turns_and_answers(messages)
    learned = _learned_turns(learn, len(answers))

    ids: list[int] = []
    loss_mask: list[int] = []
    for turn, (user_text, answer) in enumerate(zip(user_texts, answers, strict=True)):
        exchange_ids, label_start = encode_exchange(tokenizer, user_text, answer)
        is_label = 1 if turn in learned else 0
        ids += exchange_ids
        loss_mask += [0] * label_start + [is_label] * (len(exchange_ids) - label_start)
    return ids, loss_mask


def _learned_turns(learn: str | Collection[int] | None, num_turns: int) -> set[int]:
    if learn is None or learn == "all":
        return set(range(num_turns))
    if learn == "last":
        return {num_turns - 1}
    if isinstance(learn, str):
        raise ValueError(f"learn is {learn!r}, expected None, 'all', 'last' or turn indices")
    turns = set(learn)
    invalid = sorted(t for t in turns if not isinstance(t, int) or not 0 <= t < num_turns)
    if invalid:
        raise ValueError(
            f"learn selects assistant turns {invalid}, expected indices in [0, {num_turns})"
        )
    return turns
