"""A conversation rendered as one prompt, client-side.

The served models take plain text, so a chat is kept here and formatted
with a simple role-tagged template (the same for every model)::

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>
    Hello.
    <|user|>
    What is 2+2?
    <|assistant|>

Generation continues after the final ``<|assistant|>`` line and stops at the
next role tag (sent as ``stop_words``, so the tag is not returned). A model
trained with another chat template will still answer, just less well; a
server-side chat template is not part of the wire contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
STOP_WORDS = [f"<|{role}|>" for role in ROLES]


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """The turns so far; :meth:`prompt` renders them for the next assistant turn."""

    system: str = ""
    messages: list[Message] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.messages.append(Message(role, content))

    def prompt(self) -> str:
        turns = ([Message("system", self.system)] if self.system else []) + self.messages
        return "".join(f"<|{m.role}|>\n{m.content}\n" for m in turns) + "<|assistant|>\n"

    def reset(self) -> None:
        self.messages.clear()
