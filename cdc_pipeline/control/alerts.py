"""Alerts: one message when an incident opens and one when it clears, as Slack-compatible JSON for a
webhook and as a log line. Which incidents are open is the caller's state (a sensor cursor), so a
condition that persists across evaluations alerts once, not on every evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]
_ICON = {"critical": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}


@dataclass(frozen=True)
class Alert:
    """What happened, where, how bad and what to do; `incident` identifies it across evaluations."""

    incident: str
    title: str
    where: str
    summary: str
    action: str
    severity: Severity = "critical"
    details: dict[str, Any] = field(default_factory=dict)
    resolved: bool = False

    def text(self) -> str:
        """A one-message plain-text form (the webhook's `text` fallback, the log line)."""
        status = "RESOLVED" if self.resolved else self.severity.upper()
        parts = [f"[{status}] {self.title}", f"where: {self.where}", self.summary]
        if not self.resolved and self.action:
            parts.append(f"what to do: {self.action}")
        if self.details:
            parts.append("; ".join(f"{k}={v}" for k, v in self.details.items()))
        return "\n".join(parts)

    def slack_payload(self) -> dict[str, Any]:
        """An incoming-webhook body Slack (and Mattermost, Teams' Slack-compatible hooks) accepts."""
        icon = ":large_green_circle:" if self.resolved else _ICON[self.severity]
        heading = f"{icon} {'Resolved: ' if self.resolved else ''}{self.title}"
        fields = [{"type": "mrkdwn", "text": f"*Where*\n{self.where}"}]
        fields.append({"type": "mrkdwn", "text": f"*Severity*\n{'resolved' if self.resolved else self.severity}"})
        fields += [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in list(self.details.items())[:8]]
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{heading}*\n{self.summary}"}},
            {"type": "section", "fields": fields},
        ]
        if not self.resolved and self.action:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*What to do*\n{self.action}"}})
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"incident `{self.incident}`"}]})
        return {"text": self.text(), "blocks": blocks}


class Incidents:
    """Open incidents kept in a JSON-able dict (`state`), e.g. inside a sensor cursor."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state: dict[str, Any] = dict(state or {})

    def is_open(self, incident: str) -> bool:
        return incident in self.state

    def update(
        self,
        incident: str,
        active: bool,
        make_alert: Callable[[bool], Alert],
        send: Callable[[Alert], None],
    ) -> Alert | None:
        """Send the opening alert when `active` starts and the recovery when it stops; nothing
        otherwise. If sending fails the state is unchanged, so the next evaluation tries again."""
        if active == self.is_open(incident):
            return None
        alert = make_alert(not active)
        send(alert)
        if active:
            self.state[incident] = datetime.now(UTC).isoformat(timespec="seconds")
        else:
            self.state.pop(incident)
        return alert
