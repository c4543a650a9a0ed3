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
        delay = min(first_delay_s * 2.0 ** (attempts - 1), max_delay_s)
        self.state = {"attempts": attempts, "next_at": now + delay}  # also ends any healthy period
        return delay

    def failing(self) -> None:
        """Failing (again): a healthy period that had begun does not count."""
        self.state.pop("healthy_since", None)

    def healthy(self, now: float, stable_after_s: float) -> None:
        """Healthy at `now`; once healthy for `stable_after_s`, the next incident starts with the
        shortest wait again (a brief recovery between failures does not reset the backoff)."""
        since = float(self.state.setdefault("healthy_since", now))
        if now - since >= stable_after_s and self.attempts:
            self.reset()

    def reset(self) -> None:
        self.state = {"attempts": 0, "next_at": 0.0}
