"""Chat models: prompts and conversations rendered through the tokenizer's own chat template.

Scoring and training render text the same way, here, so the tokens an adapter is trained on
are the tokens it is scored on. A prompt (one string: a task's context, few-shot examples
included) is ONE user turn; a conversation (`messages`) is rendered as it is. Either ends with
the template's generation prompt, where the assistant's answer starts, which is how
lm-evaluation-harness's `--apply_chat_template` renders a zero-shot prompt.

A conversation is `[{"role": "system"|"user"|"assistant", "content": str}, ...]` ending with the
assistant message that is its answer (`split_messages`). Without a chat template a conversation
is read as plain text, each turn's content followed by a blank line, the answer being the next
turn (`plain_text`); the default stop string, a blank line, ends it.
"""

from __future__ import annotations

from typing import Any, Union

from muscle_ray.errors import BadRow, MuscleError

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]
ROLES = ("system", "user", "assistant")


def split_messages(messages: Any, row: int | None = None) -> tuple[Messages, str]:
    """(the conversation before the answer, the answer): the last message must be the
    assistant's, and something must come before it. A BadRow says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("field 'messages' must be a non-empty list of {role, content} objects", row)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise BadRow(f'messages[{i}] must be {{"role": {"|".join(ROLES)}, "content": str}}, got {m!r}'[:200], row)
    if messages[-1]["role"] != "assistant":
        raise BadRow("the last message must be the assistant's answer", row)
    if len(messages) == 1:
        raise BadRow("messages hold only the answer: no turn comes before it", row)
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]


def plain_text(prompt: Prompt) -> str:
    """A prompt as plain text, for a model read without a chat template."""
    return prompt if isinstance(prompt, str) else "".join(m["content"] + "\n\n" for m in prompt)


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


def require_chat_template(tokenizer) -> None:
    """Refuse, naming the model, a tokenizer that has no chat template to render with."""
    if not getattr(tokenizer, "chat_template", None):
        raise MuscleError(
            f"{model_name(tokenizer)}: chat_template is on but the tokenizer has no chat template "
            "(tokenizer_config.json sets no chat_template); use a chat model or chat_template: false"
        )


def _apply(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError

    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
        raise MuscleError(f"{model_name(tokenizer)}: its chat template refused the conversation: {e}") from None


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text a chat model continues: the prompt as the user's turn (or the conversation),
    then the template's generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return _apply(tokenizer, messages, add_generation_prompt=True)


def render_turn(tokenizer, prompt: Prompt, answer: str) -> tuple[str, str]:
    """(rendered prompt, the assistant's turn after it): the answer with the template's own
    end-of-turn, so training on the second part is training on exactly the assistant turn."""
    head = render_prompt(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    whole = _apply(tokenizer, messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    if not whole.startswith(head):
        raise MuscleError(
            f"{model_name(tokenizer)}: its chat template renders a conversation with an answer "
            "differently from the same conversation awaiting one; cannot tell the assistant turn apart"
        )
    return head, whole[len(head) :]
