"""Staged rollouts that stop themselves: publish a bundle to a group stage by stage (5% -> 25% -> 100%),
soak each stage, and on too many failures put the group back on its previous desired state.

The plan follows AWS IoT Jobs (`jobExecutionsRolloutConfig`, `abortConfig`) and Mender's phased
deployments. One publication id serves the whole rollout: raising `percent` only adds devices (their
bucket is stable, edgellm/daemon/update/bundle.py `rollout_bucket`), and a device acts on an id once, so
no device outside the current stage ever receives the bundle.

    plan -> RUNNING(stage 0) -> RUNNING(stage 1) -> ... -> COMPLETED
                     \\                 \\
                      ABORTED           ABORTED   (the previous desired state is published again)

`judge()` decides each step from counts alone; `Rollout` watches the retained reports, publishes the
rollout's own status (retained on {root}/groups/{group}/rollout, shown by `fleet status`) and appends
every event to the host's history (`RolloutHistory`, SQLite).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field

from edgellm.daemon.update.bundle import DesiredState, in_rollout
from edgellm.daemon.update.states import TERMINAL, UpdateState
from edgellm.models.errors import BuildError

log = logging.getLogger("edgellm.rollout")


@dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[float, ...] = (5.0, 25.0, 100.0)  # percent of the group, rising, ending at 100
    soak_seconds: float = 600.0  # a stage lasts at least this long, however fast its devices finish
    abort_percent: float = 10.0  # abort when this share of the finished updates FAILED or ROLLED_BACK ...
    abort_min_reports: int = 3  # ... once at least this many updates have finished
    stage_timeout: float = 3600.0  # abort when a stage's online devices have not all finished by then

    def __post_init__(self):
        if not self.stages or any(not 0 < s <= 100 for s in self.stages):
            raise BuildError("--stages: percentages above 0 and at most 100, e.g. 5,25,100")
        if list(self.stages) != sorted(set(self.stages)) or self.stages[-1] != 100:
            raise BuildError(f"--stages: {','.join(f'{s:g}' for s in self.stages)} must rise and end at 100")
        if not 0 < self.abort_percent <= 100:
            raise BuildError("--abort-percent: above 0 and at most 100")
        if self.abort_min_reports < 1 or self.soak_seconds < 0 or self.stage_timeout <= self.soak_seconds:
            raise BuildError("--abort-min-reports: at least 1; --soak: 0 or more; --stage-timeout: above --soak")


class RolloutState(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"


class Counts(BaseModel):
    """One rollout's devices, as their retained reports and presence say."""

    members: int = 0  # devices whose presence names the group
    in_stage: int = 0  # members the current percent reaches
    pending: int = 0  # online in-stage members without a finished report for this rollout
    succeeded: int = 0
    failed: int = 0
    rolled_back: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.rolled_back

    @property
    def bad(self) -> int:
        return self.failed + self.rolled_back


class RolloutStatus(BaseModel):
    """Retained on {root}/groups/{group}/rollout (docs/mqtt-api.md)."""

    rollout_id: str
    group: str
    name: str
    version: str
    state: RolloutState
    stage: int = Field(description="index into stages")
    stages: list[float]
    percent: float
    counts: Counts
    reason: str | None = None
    started_at: float
    stage_started_at: float
    ts: float = Field(default_factory=time.time)


class Verdict(StrEnum):
    WAIT = "WAIT"
    ADVANCE = "ADVANCE"
    COMPLETE = "COMPLETE"
    ABORT = "ABORT"


def judge(plan: RolloutPlan, stage: int, counts: Counts, stage_age: float) -> tuple[Verdict, str]:
    """What to do next, and why. Failures are judged first and at any time: a bad release stops as soon as
    enough of its updates have finished, without waiting for the soak."""
    if counts.finished >= plan.abort_min_reports and 100 * counts.bad / counts.finished >= plan.abort_percent:
        return Verdict.ABORT, (f"{counts.bad} of {counts.finished} finished updates failed or rolled back "
                               f"({100 * counts.bad / counts.finished:.0f}% >= {plan.abort_percent:g}%)")
    if counts.pending:
        if stage_age >= plan.stage_timeout:
            return Verdict.ABORT, (f"{counts.pending} online devices of stage {stage + 1} had not finished after "
                                   f"{plan.stage_timeout:g} s")
        return Verdict.WAIT, f"{counts.pending} devices of the stage are updating"
    if stage_age < plan.soak_seconds:
        return Verdict.WAIT, f"soaking ({stage_age:.0f} of {plan.soak_seconds:g} s)"
    if stage + 1 == len(plan.stages):
        return Verdict.COMPLETE, f"{counts.succeeded} devices succeeded"
    return Verdict.ADVANCE, f"stage {stage + 1} soaked {stage_age:.0f} s with {counts.bad} failures"


def count(watch, group: str, desired: DesiredState) -> Counts:
    """Counts for one rollout from a FleetWatch (edgellm/models/fleet/host.py)."""
    c = Counts()
    for device, row in watch.snapshot().items():
        report = row.update if row.update.get("desired_id") == desired.id else {}
        state = report.get("state")
        c.succeeded += state == UpdateState.SUCCEEDED
        c.failed += state == UpdateState.FAILED
        c.rolled_back += state == UpdateState.ROLLED_BACK
        if group not in row.groups:
            continue
        c.members += 1
        if in_rollout(device, desired.percent):
            c.in_stage += 1
            online = row.presence.get("state") == "online"
            c.pending += online and state not in TERMINAL  # the agent's own finished states
    return c


class RolloutHistory:
    """Every rollout event, appended to a SQLite file on the host: what `fleet history` prints after the
    retained messages are gone."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS events (ts REAL NOT NULL, rollout_id TEXT NOT NULL, "
                       "grp TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, event TEXT NOT NULL, "
                       "stage INTEGER NOT NULL, percent REAL NOT NULL, counts TEXT NOT NULL, reason TEXT)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def append(self, status: RolloutStatus, event: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (status.ts, status.rollout_id, status.group, status.name, status.version, event,
                        status.stage, status.percent, status.counts.model_dump_json(), status.reason))

    def events(self, group: str | None = None) -> list[dict]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM events WHERE ? IS NULL OR grp = ? ORDER BY ts, rowid",
                              (group, group)).fetchall()
        return [{**dict(r), "group": r["grp"], "counts": json.loads(r["counts"])} for r in rows]


def default_history_path() -> Path:
    import os

    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(state) / "edgellm" / "rollouts.sqlite"


class Rollout:
    """Drives one rollout to COMPLETED or ABORTED. `publish_desired` and `publish_status` are the MQTT side
    (edgellm/models/fleet/host.py); `restore` is the desired state to put back on abort (None clears it)."""

    def __init__(self, group: str, desired: DesiredState, plan: RolloutPlan, watch, history: RolloutHistory,
                 publish_desired, publish_status, restore: DesiredState | None, poll: float = 1.0):
        self.group, self.desired, self.plan, self.watch = group, desired, plan, watch
        self.history, self.publish_desired, self.publish_status = history, publish_desired, publish_status
        self.restore, self.poll = restore, poll
        now = time.time()
        self.status = RolloutStatus(rollout_id=uuid.uuid4().hex[:12], group=group, name=desired.name,
                                    version=desired.version, state=RolloutState.RUNNING, stage=0,
                                    stages=list(plan.stages), percent=plan.stages[0], counts=Counts(),
                                    started_at=now, stage_started_at=now)

    def run(self) -> RolloutStatus:
        self._publish_stage("started")
        while True:
            counts = count(self.watch, self.group, self.desired)
            verdict, reason = judge(self.plan, self.status.stage, counts, time.time() - self.status.stage_started_at)
            self._update(counts=counts, reason=reason)
            if verdict is Verdict.ABORT:
                self._abort(reason)
                return self.status
            if verdict is Verdict.COMPLETE:
                self._update(state=RolloutState.COMPLETED)
                self._record("completed")
                return self.status
            if verdict is Verdict.ADVANCE:
                stage = self.status.stage + 1
                self._update(stage=stage, percent=self.plan.stages[stage], stage_started_at=time.time())
                self._publish_stage("advanced")
            else:
                self.publish_status(self.status)
            time.sleep(self.poll)

    def _publish_stage(self, event: str) -> None:
        self.desired = self.desired.model_copy(update={"percent": self.status.percent})
        self.publish_desired(self.desired)
        log.info("%s %s: stage %d, %g%% of %s", self.desired.name, self.desired.version, self.status.stage + 1,
                 self.status.percent, self.group)
        self._record(event)

    def _abort(self, reason: str) -> None:
        if self.restore is None:
            self.publish_desired(None)
            reason += "; the group had no previous desired state, so it was cleared"
        else:
            self.publish_desired(self.restore)
            reason += f"; {self.restore.name} {self.restore.version} published again"
            if self.restore.allow_downgrade is None:
                reason += " (without --key: devices that took the release keep it)"
        self._update(state=RolloutState.ABORTED, reason=reason)
        self._record("aborted")

    def _update(self, **fields) -> None:
        self.status = self.status.model_copy(update={**fields, "ts": time.time()})

    def _record(self, event: str) -> None:
        self.publish_status(self.status)
        self.history.append(self.status, event)
