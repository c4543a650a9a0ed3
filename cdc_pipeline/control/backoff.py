"""Exponential backoff between automatic restarts (of the stream, of failed connector tasks), kept in
a JSON-able dict inside a sensor cursor: something that fails again right after each restart is
retried less and less often instead of at every evaluation."""

from __future__ import annotations

from typing import Any


class RestartBackoff:
    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = {"attempts": 0, "next_at": 0.0, **(state or {})}

    @property
    def attempts(self) -> int:
        return int(self.state["attempts"])

    def due(self, now: float) -> bool:
        return now >= float(self.state["next_at"])

    def record_attempt(self, now: float, first_delay_s: float, max_delay_s: float) -> float:
        """Count a restart made at `now`; returns the wait before the next one may be made."""
        attempts = self.attempts + 1
        delay = min(first_delay_s * 2 ** (attempts - 1), max_delay_s)
        self.state = {"attempts": attempts, "next_at": now + delay}
        return delay

    def reset(self) -> None:
        """The problem cleared: the next incident starts with the shortest wait again."""
        self.state = {"attempts": 0, "next_at": 0.0}
