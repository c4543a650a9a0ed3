"""Alert rules of the replication sensor and the check-failure sensor, as pure functions: an
observation (and the rule's state from the sensor cursor) in, a verdict (and the new state) out. No
Dagster, no I/O: the sensors measure, call these, and deliver the alerts; the tests call them with
made-up observations.

Rules:
- slot retention: the replication slot holds more WAL than `max_bytes` (PostgreSQL cannot remove it:
  the disk fills), or has not advanced for `max_age_s` while WAL is behind it (nothing confirms the
  changes: a paused, failed or deleted connector);
- paused connector: the connector has been PAUSED for `max_paused_s` (while paused, the slot
  retains WAL);
- missing connector: the pipeline's connector is not in Kafka Connect, for longer than `grace_s`;
- failed check: the newest evaluation of an ERROR-severity asset check failed;
- connector running: the connector and every one of its tasks (at least one) are RUNNING;
- connector failures: the connector or a task is FAILED (the connector_status sensor's incident), and
  whether to restart the failed parts now, wait for the backoff, or count a healthy evaluation;
- replication health: the slot, paused and missing rules together over the replication_health sensor's
  typed cursor (a source or Connect that cannot be read leaves its rules' state as it was).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cdc_pipeline.control.cursors import ReplicationCursor

RUNNING = "RUNNING"


@dataclass(frozen=True)
class Verdict:
    """Whether the rule's incident is active, and the words and numbers for its alert."""

    active: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def human_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class SlotObservation:
    """One reading of `pg_replication_slots` for the pipeline's slot (`exists` False: no such slot)."""

    slot_name: str
    exists: bool
    active: bool = False
    confirmed_flush_lsn: str | None = None
    retained_bytes: int | None = None  # pg_current_wal_lsn() - confirmed_flush_lsn


def slot_retention(
    observation: SlotObservation,
    state: dict[str, Any] | None,
    now: float,
    max_bytes: int,
    max_age_s: float,
) -> tuple[Verdict, Verdict, dict[str, Any]]:
    """(bytes verdict, age verdict, new state). The state remembers the slot's last confirmed LSN and
    since when it has been there; the age is the time since the slot last advanced, counted only while
    WAL is behind it (an idle server whose slot is at the current position is not stuck). A slot that
    does not exist yields no incident (the missing-connector rule speaks for it)."""
    previous = state or {}
    if not observation.exists or observation.confirmed_flush_lsn is None:
        quiet = Verdict(False, f"slot {observation.slot_name} does not exist")
        return quiet, quiet, {}
    retained = max(0, observation.retained_bytes or 0)
    lsn = observation.confirmed_flush_lsn
    # It advanced (or holds nothing): the clock starts again.
    advanced = previous.get("lsn") != lsn or retained == 0
    since = now if advanced else float(previous.get("since", now))
    age = now - since
    details = {
        "slot": observation.slot_name,
        "retained_wal": human_bytes(retained),
        "retained_wal_bytes": retained,
        "confirmed_flush_lsn": lsn,
        "not_advanced_for": human_seconds(age),
        "slot_active": observation.active,
    }
    over_bytes = retained > max_bytes
    by_bytes = Verdict(
        over_bytes,
        f"slot {observation.slot_name} retains {human_bytes(retained)} of WAL (limit {human_bytes(max_bytes)}): "
        "PostgreSQL keeps it until the connector confirms it, so the server's disk fills"
        if over_bytes
        else f"slot {observation.slot_name} retains {human_bytes(retained)} of WAL, within the limit",
        {**details, "limit": human_bytes(max_bytes)},
    )
    stuck = retained > 0 and age >= max_age_s
    by_age = Verdict(
        stuck,
        f"slot {observation.slot_name} has not advanced for {human_seconds(age)} (limit {human_seconds(max_age_s)}) "
        f"while {human_bytes(retained)} of WAL waits behind it: nothing is confirming the changes"
        if stuck
        else f"slot {observation.slot_name} advances again",
        {**details, "limit": human_seconds(max_age_s)},
    )
    return by_bytes, by_age, {"lsn": lsn, "since": since}


def connector_paused(
    connector_state: str | None, paused_since: float | None, now: float, max_paused_s: float
) -> tuple[Verdict, float | None]:
    """(verdict, new paused_since). `connector_state` is Connect's state of the connector (None: it does
    not exist). The verdict is active once it has been PAUSED for `max_paused_s`."""
    if connector_state != "PAUSED":
        return Verdict(False, f"the connector is {connector_state or 'gone'}, no longer paused"), None
    since = paused_since if paused_since is not None else now
    paused_for = now - since
    active = paused_for >= max_paused_s
    return (
        Verdict(
            active,
            f"the connector has been PAUSED for {human_seconds(paused_for)} (limit {human_seconds(max_paused_s)}): "
            "no change is captured and PostgreSQL retains WAL for its slot meanwhile",
            {"paused_for": human_seconds(paused_for)},
        ),
        since,
    )


def connector_missing(
    exists: bool, missing_since: float | None, now: float, grace_s: float
) -> tuple[Verdict, float | None]:
    """(verdict, new missing_since): active once the configured connector has been absent from Kafka
    Connect for `grace_s` (a connector being re-created is not an incident)."""
    if exists:
        return Verdict(False, "the connector exists again"), None
    since = missing_since if missing_since is not None else now
    missing_for = now - since
    return (
        Verdict(
            missing_for >= grace_s,
            f"the connector is not in Kafka Connect (missing for at least {human_seconds(missing_for)}): nothing is "
            "captured, and PostgreSQL retains WAL for its slot",
            {"missing_for": human_seconds(missing_for)},
        ),
        since,
    )


@dataclass(frozen=True)
class CheckOutcome:
    """The newest completed evaluation of one asset check."""

    asset: str
    check: str
    passed: bool
    severity: str  # "ERROR" or "WARN"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def failed_error_check(outcome: CheckOutcome | None) -> Verdict | None:
    """The check-failure incident of one check: active when its newest evaluation failed with ERROR
    severity, inactive when it passed; None (leave the incident as it is) when it never ran, or failed
    with WARN severity (a warning is shown in the UI, not paged)."""
    if outcome is None:
        return None
    if outcome.passed:
        return Verdict(False, f"{outcome.check} on {outcome.asset} passes again", dict(outcome.metadata))
    if outcome.severity.upper() != "ERROR":
        return None
    summary = f"{outcome.check} on {outcome.asset} failed" + (f": {outcome.description}" if outcome.description else "")
    return Verdict(True, summary, dict(outcome.metadata))


def connector_states(status: Mapping[str, Any]) -> list[str]:
    """The states in a Kafka Connect status answer (`GET /connectors/<name>/status`): the connector's,
    then each task's."""
    return [status["connector"]["state"], *(task["state"] for task in status.get("tasks", []))]


def connector_running(status: Mapping[str, Any]) -> bool:
    """The connector runs: it and every task are RUNNING, and it has at least one task (a connector
    without tasks captures nothing)."""
    return bool(status.get("tasks")) and all(state == RUNNING for state in connector_states(status))


def connector_state(status: Mapping[str, Any]) -> str:
    """`RUNNING` when `connector_running`; otherwise the states that are not (`FAILED`, `PAUSED/UNASSIGNED`),
    or `without tasks`."""
    if connector_running(status):
        return RUNNING
    return "/".join(sorted(set(connector_states(status)) - {RUNNING})) or "without tasks"


def connector_failures(status: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(the FAILED parts of a Kafka Connect status answer: the connector as id `connector`, then its tasks;
    a summary naming each with its worker and the first line of its trace, "" when nothing failed)."""
    failed: list[dict[str, Any]] = []
    if status["connector"]["state"] == "FAILED":
        failed.append({"id": "connector", **status["connector"]})
    failed += [dict(t) for t in status.get("tasks", []) if t["state"] == "FAILED"]
    summary = "; ".join(
        f"{'task ' + str(t['id']) if t['id'] != 'connector' else 'connector'} FAILED on "
        f"{t.get('worker_id', '?')}: {(t.get('trace') or 'no trace').splitlines()[0][:300]}"
        for t in failed
    )
    return failed, summary


@dataclass(frozen=True)
class ConnectorReading:
    """One `GET /connectors/<name>/status`: the answer, or `missing` (404: not in Kafka Connect), or why
    it could not be read (`error`: refused or unreachable)."""

    status: Mapping[str, Any] | None = None
    missing: bool = False
    error: str = ""

    @property
    def exists(self) -> bool | None:
        """True or False; None when Connect could not say."""
        return True if self.status is not None else False if self.missing else None

    @property
    def state(self) -> str | None:
        """The connector's own state (None: not read, or missing)."""
        return str(self.status["connector"]["state"]) if self.status is not None else None


RestartStep = Literal["restart", "wait", "healthy", "none"]


@dataclass(frozen=True)
class ConnectorHealth:
    """The connector_status verdict: the FAILED parts, the incident's `problem` ("" when none) and what to do
    with the task-restart backoff: `restart` the failed parts now, `wait` for the backoff (still failing),
    count a `healthy` evaluation, or nothing (`none`: a problem no restart fixes, or restarts are off)."""

    failed: list[dict[str, Any]]
    problem: str
    step: RestartStep


def connector_health(reading: ConnectorReading, restart_enabled: bool, restart_due: bool) -> ConnectorHealth:
    """The connector_status rules for a reading of an existing (or unreadable) connector; `restart_due`:
    the backoff allows a restart now."""
    failed, problem = connector_failures(reading.status) if reading.status is not None else ([], reading.error)
    if failed and restart_enabled:
        return ConnectorHealth(failed, problem, "restart" if restart_due else "wait")
    return ConnectorHealth(failed, problem, "none" if problem else "healthy")


@dataclass(frozen=True)
class ReplicationLimits:
    """The replication_health thresholds (the monitor's settings)."""

    slot_max_retained_bytes: int
    slot_max_retention_age_s: float
    connector_max_paused_s: float
    connector_missing_grace_s: float


@dataclass(frozen=True)
class ReplicationVerdict:
    """The slot verdicts (None: the slot could not be read), the paused and missing verdicts (None:
    Connect could not be read), and the cursor for the next evaluation (its incidents as given)."""

    slot_bytes: Verdict | None
    slot_age: Verdict | None
    paused: Verdict | None
    missing: Verdict | None
    cursor: ReplicationCursor


def replication_health(
    slot: SlotObservation | None,
    connector: ConnectorReading,
    cursor: ReplicationCursor,
    now: float,
    limits: ReplicationLimits,
) -> ReplicationVerdict:
    """The slot-retention, paused-connector and missing-connector rules over one observation of the slot
    (None: PostgreSQL could not be read) and of the connector, with their state from `cursor`."""
    by_bytes = by_age = paused = missing = None
    slot_state, paused_since, missing_since = cursor.slot, cursor.paused_since, cursor.missing_since
    if slot is not None:
        by_bytes, by_age, slot_state = slot_retention(
            slot, cursor.slot, now, limits.slot_max_retained_bytes, limits.slot_max_retention_age_s
        )
    exists = connector.exists
    if exists is not None:
        paused, paused_since = connector_paused(
            connector.state, cursor.paused_since, now, limits.connector_max_paused_s
        )
        missing, missing_since = connector_missing(exists, cursor.missing_since, now, limits.connector_missing_grace_s)
    next_cursor = ReplicationCursor(dict(cursor.incidents), slot_state, paused_since, missing_since)
    return ReplicationVerdict(by_bytes, by_age, paused, missing, next_cursor)
