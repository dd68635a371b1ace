"""A conversation kept client-side, sent whole each turn as the ``messages`` input.

The server renders the messages with the model's own chat template (the one it
was trained with) and generation stops at the template's end-of-turn token, so
the client adds no role tags or stop words of its own::

    chat = Conversation(system="You are terse.")
    chat.add("user", "Hi!")
    reply = client.generate(chat.messages(), max_tokens=64).text
    chat.add("assistant", reply)
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """The turns so far; :meth:`messages` is the chat to send for the next assistant turn."""

    system: str = ""
    turns: list[Message] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.turns.append(Message(role, content))

    def messages(self) -> list[dict[str, str]]:
        """The system message (if any) and every turn, as ``{"role", "content"}`` dicts."""
        turns = ([Message("system", self.system)] if self.system else []) + self.turns
        return [{"role": m.role, "content": m.content} for m in turns]

    def reset(self) -> None:
        self.turns.clear()
