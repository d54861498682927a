"""The update agent's state machine: the transitions it may take, and the report it keeps on disk."""

from __future__ import annotations

import pytest

from edgellm.daemon.update.slots import SlotStore
from edgellm.daemon.update.states import (
    TRANSITIONS,
    IllegalTransition,
    UpdateReport,
    UpdateState,
    check_transition,
)

S = UpdateState


def test_the_happy_path_and_the_failures_are_allowed():
    path = [None, S.QUEUED, S.DOWNLOADING, S.DOWNLOADING, S.VERIFYING, S.TESTING, S.ACTIVATING, S.SUCCEEDED]
    for current, new in zip(path, path[1:], strict=False):
        check_transition(current, new)
    for state in (S.QUEUED, S.DOWNLOADING, S.VERIFYING, S.TESTING, S.ACTIVATING):
        check_transition(state, S.FAILED)  # an internal error may end any unfinished update
        check_transition(state, S.QUEUED)  # and a shutdown pauses it, to resume at the next start
    check_transition(S.TESTING, S.ROLLED_BACK)
    check_transition(S.ACTIVATING, S.ROLLED_BACK)


@pytest.mark.parametrize(("current", "new"), [
    (None, S.DOWNLOADING), (S.QUEUED, S.ACTIVATING), (S.DOWNLOADING, S.SUCCEEDED), (S.VERIFYING, S.ROLLED_BACK),
    (S.SUCCEEDED, S.QUEUED), (S.FAILED, S.DOWNLOADING), (S.ROLLED_BACK, S.SUCCEEDED)])
def test_skipping_a_step_or_leaving_a_final_state_is_refused(current, new):
    with pytest.raises(IllegalTransition, match="not allowed"):
        check_transition(current, new)


def test_every_state_has_its_row_and_final_states_lead_nowhere():
    assert set(TRANSITIONS) == {None, *S}
    assert all(not TRANSITIONS[s] for s in S if s.terminal)


def test_the_report_survives_a_restart_and_a_damaged_file_starts_afresh(tmp_path):
    slots = SlotStore(tmp_path)
    report = UpdateReport(device="gw-a", desired_id="d1", name="tiny", version="2", state=S.DOWNLOADING,
                          bytes_done=10, history={S.QUEUED: 1.0, S.DOWNLOADING: 2.0})
    slots.save_report(report)
    assert SlotStore(tmp_path).last_report() == report
    (tmp_path / "report.json").write_text("{not json")
    assert SlotStore(tmp_path).last_report() is None
