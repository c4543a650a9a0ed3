"""Typed cursors of the connector, replication, check-failure, run-failure and stream-metrics sensors
(those of consumer lag and checkpoint health are in stream_rules.py), and the tolerant JSON parsing they
share. No Dagster: a sensor parses its cursor, hands the parts to its rules, and stores `serialize()`.

Parsing keeps what is well formed in whatever an older sensor stored (or garbage) and uses defaults for
the rest, rather than fail: a sensor must keep evaluating after an upgrade.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EPOCH = "1970-01-01T00:00:00"


def load_state(text: str | None) -> dict[str, Any]:
    """The JSON object in `text`; {} when it is empty, not JSON, or not an object."""
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def as_dict(value: object) -> dict[str, Any]:
    """A copy of `value` if it is a dict, else {}."""
    return dict(value) if isinstance(value, dict) else {}


def as_number(value: object) -> float | None:
    """`value` if it is an int or float (not a bool), else None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def as_int(value: object) -> int | None:
    """`value` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class IncidentsCursor:
    """The alert_on_check_failure sensor's cursor: the open incidents."""

    incidents: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> IncidentsCursor:
        return cls(as_dict(load_state(text).get("incidents")))

    def serialize(self) -> str:
        return json.dumps({"incidents": self.incidents})


@dataclass
class ConnectorCursor:
    """The connector_status sensor's cursor: open incidents and the task-restart backoff's state."""

    incidents: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> ConnectorCursor:
        state = load_state(text)
        return cls(as_dict(state.get("incidents")), as_dict(state.get("restart")))

    def serialize(self) -> str:
        return json.dumps({"incidents": self.incidents, "restart": self.restart})


@dataclass
class ReplicationCursor:
    """The replication_health sensor's cursor: open incidents, the slot rule's state (`slot_retention`:
    last confirmed LSN and since when; None: never read) and since when the connector has been paused or
    missing (epoch s; None: it is not)."""

    incidents: dict[str, Any] = field(default_factory=dict)
    slot: dict[str, Any] | None = None
    paused_since: float | None = None
    missing_since: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> ReplicationCursor:
        state = load_state(text)
        slot = state.get("slot")
        return cls(
            as_dict(state.get("incidents")),
            dict(slot) if isinstance(slot, dict) else None,
            as_number(state.get("paused_since")),
            as_number(state.get("missing_since")),
        )

    def serialize(self) -> str:
        return json.dumps(
            {
                "incidents": self.incidents,
                "slot": self.slot,
                "paused_since": self.paused_since,
                "missing_since": self.missing_since,
            }
        )


@dataclass
class RunFailureCursor:
    """The alert_on_run_failure sensor's cursor: the storage id of the newest run failure seen (None: the
    first evaluation, which starts from the newest failure, not the instance's history) and the failed
    runs whose alert is not delivered yet. Dagster's own run_failure_sensor stored `record_id`: it is
    read as `after`."""

    after: int | None = None
    pending: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> RunFailureCursor:
        state = load_state(text)
        after = as_int(state.get("after")) if "after" in state else as_int(state.get("record_id"))
        pending = state.get("pending")
        runs = [r for r in pending if isinstance(r, str)] if isinstance(pending, list) else []
        return cls(after, runs)

    def serialize(self) -> str:
        return json.dumps({"after": self.after, "pending": self.pending})


def progress_cursor(recorded_at: object) -> str:
    """The stream_metrics sensor's cursor from the newest progress row's `recorded_at`: ISO 8601 in UTC
    (DateTime64(3, 'UTC') may come back naive: it is UTC, not the daemon host's local time)."""
    if isinstance(recorded_at, datetime):
        utc = recorded_at.replace(tzinfo=UTC) if recorded_at.tzinfo is None else recorded_at.astimezone(UTC)
        return utc.isoformat()
    return str(recorded_at)
