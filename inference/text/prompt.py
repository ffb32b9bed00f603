"""Messages -> prompt token ids, through the tokenizer's own chat template.

- Templates without a system role (Gemma2 raises on one) get the system text folded into the next
  user turn, so nothing the client sent is dropped.
- Message text is tokenized with special-token parsing switched off, so a user who types
  `<end_of_turn>` or `<|im_start|>` gets those characters as plain text, never a forged turn. Only
  the template itself places control tokens.
- Terminators are EOS plus whichever end-of-turn tokens the vocabulary really has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from inference.types import InvalidRequest, Message

END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|eom_id|>")

# Private-use code points mark where each message's content sits in the rendered template.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def resolve_terminators(tokenizer: Any) -> list[int]:
    """EOS id(s) plus the end-of-turn tokens present in the vocabulary, never the unknown token."""
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for token_id in eos if isinstance(eos, list) else [eos]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    for token in END_OF_TURN_TOKENS:
        token_id = vocab.get(token)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(int(token_id))
    return ids


def fold_system_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """System text merged into the next user turn (or sent as a last user turn), for templates without a system role.

    The one rule for both the local PromptBuilder and the remote engine (REMOTE_SYSTEM_ROLE), so a conversation
    means the same thing on every engine.
    """
    folded: list[dict[str, str]] = []
    pending_system: list[str] = []
    for message in messages:
        if message.role == "system":
            pending_system.append(message.content)
            continue
        content = message.content
        if pending_system and message.role == "user":
            content = "\n\n".join([*pending_system, content])
            pending_system = []
        folded.append({"role": message.role, "content": content})
    if pending_system:  # a system message after the last user turn still reaches the model
        folded.append({"role": "user", "content": "\n\n".join(pending_system)})
    return folded


class PromptBuilder:
    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; this service serves chat (instruct) models")
        self.tokenizer = tokenizer
        self.supports_system_role = self._probe_system_role()

    def _probe_system_role(self) -> bool:
        """Whether the template renders a system message: it must neither raise nor silently drop it.

        The probe texts are private-use markers, so template text ("system", "user", ...) cannot fake them.
        """
        system_text, user_text = f"{_MARK_OPEN}system-probe{_MARK_CLOSE}", f"{_MARK_OPEN}user-probe{_MARK_CLOSE}"
        probe = [{"role": "system", "content": system_text}, {"role": "user", "content": user_text}]
        try:
            rendered = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            return False
        return system_text in rendered

    def template_messages(self, messages: Sequence[Message]) -> list[dict[str, str]]:
        """The messages as the template will get them: system text folded in where the template has no system role."""
        if self.supports_system_role:
            return [{"role": m.role, "content": m.content} for m in messages]
        return fold_system_messages(messages)

    def build(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the whole prompt, ending with the template's generation prompt."""
        if not messages or messages[-1].role != "user":
            raise InvalidRequest("the conversation must end with a user message", param="messages")
        template_messages = self.template_messages(messages)
        marked = [
            {"role": m["role"], "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, m in enumerate(template_messages)
        ]
        try:
            rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            raise InvalidRequest(
                f"the model's chat template rejected the conversation: {error}", param="messages"
            ) from None
        ids: list[int] = []
        pieces = _MARK_RE.split(rendered)
        # split() alternates: template text, message index, template text, ...
        for position, piece in enumerate(pieces):
            if position % 2 == 0:
                if piece:
                    ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            else:
                content = template_messages[int(piece)]["content"]
                if content:
                    ids += self.tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids
