"""The update agent's states, the transitions allowed between them, and the report it publishes.

Modelled on Mender's update state machine, with AWS IoT Jobs' names for what the fleet sees:

    (idle) -> QUEUED -> DOWNLOADING -> VERIFYING -> TESTING -> ACTIVATING -> SUCCEEDED
                 \\            \\             \\           \\            \\
                  FAILED        FAILED        FAILED     ROLLED_BACK    ROLLED_BACK

- FAILED: the new model never became a candidate (bad signature, refused downgrade, a chunk that does not
  match its sha256, the store unreachable). ROLLED_BACK: it was tested or switched to, and rejected.
- Any unfinished state may go back to QUEUED: a shutdown pauses an update and the next start resumes it.
- Any unfinished state may end in FAILED: an unexpected error inside the agent.
- QUEUED -> SUCCEEDED: the device already runs the desired version.
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class UpdateState(StrEnum):
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    TESTING = "TESTING"
    ACTIVATING = "ACTIVATING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


S = UpdateState
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.ROLLED_BACK})
UNFINISHED = frozenset(S) - TERMINAL
TRANSITIONS: dict[UpdateState | None, frozenset[UpdateState]] = {
    None: frozenset({S.QUEUED}),  # a new desired state (or the first report of this device)
    S.QUEUED: frozenset({S.QUEUED, S.DOWNLOADING, S.SUCCEEDED, S.FAILED}),
    S.DOWNLOADING: frozenset({S.QUEUED, S.DOWNLOADING, S.VERIFYING, S.FAILED}),  # DOWNLOADING: progress
    S.VERIFYING: frozenset({S.QUEUED, S.TESTING, S.FAILED}),
    S.TESTING: frozenset({S.QUEUED, S.ACTIVATING, S.ROLLED_BACK, S.FAILED}),
    S.ACTIVATING: frozenset({S.QUEUED, S.SUCCEEDED, S.ROLLED_BACK, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug in the agent: it tried a transition the table does not allow."""


def check_transition(current: UpdateState | None, new: UpdateState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"update state {current or '(idle)'} -> {new} is not allowed")


class UpdateReport(BaseModel):
    """The latest update as the device reports it, retained on {root}/{device}/update (docs/mqtt-api.md)."""

    model_config = ConfigDict(extra="ignore")  # reports written by older versions still load

    device: str
    desired_id: str
    name: str
    version: str
    state: UpdateState
    reason: str | None = None
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    bytes_done: int | None = None
    bytes_total: int | None = Field(None, description="all of the bundle's chunks")
    bytes_transferred: int | None = Field(None, description="what this run fetched over the network")
    full_bytes: int | None = Field(None, description="the whole bundle, for comparison")
    history: dict[UpdateState, float] = Field(default_factory=dict, description="when each state was first reached")
    ts: float = Field(default_factory=time.time)
