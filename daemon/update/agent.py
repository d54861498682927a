"""The update agent inside the daemon: follow the desired state, fetch only missing chunks, verify,
smoke-test in a child process, switch atomically, roll back on failure, and report every step.

Its states and the transitions between them are in edgellm/daemon/update/states.py; every report goes
through `_set`, which checks the transition against that table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.update.bundle import (
    BundleManifest,
    Delta,
    DesiredState,
    chunk_path,
    delta_path,
    downgrade_statement,
    fetch_signed,
    in_rollout,
    is_older,
    load_public_key,
    verify_signature,
)
from edgellm.daemon.update.delta import apply_delta
from edgellm.daemon.update.fetch import Fetcher, FetchError, FetchOptions, Stopped
from edgellm.daemon.update.remerge import compute_weight, load_factors
from edgellm.daemon.update.settings import UpdateSettings
from edgellm.daemon.update.slots import ActiveState, SlotStore, write_atomic
from edgellm.daemon.update.states import UpdateReport, UpdateState, check_transition

log = logging.getLogger("edgellm.update")
S = UpdateState


class UpdateFailed(Exception):
    """Ends an update in `state` (FAILED or ROLLED_BACK), with the reason the report gives."""

    def __init__(self, state: UpdateState, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


@dataclass
class Hooks:
    """What the agent needs from the running daemon."""

    publish: Callable[[UpdateReport], None]  # the retained report on {root}/{device}/update
    activate: Callable[[Path | None], None]  # serve this model folder (None: the configured model.path)
    health_problem: Callable[[], str | None]  # a golden prompt through the serving engine
    internal_errors: Callable[[], int]


class UpdateAgent:
    def __init__(self, settings: UpdateSettings, device_id: str, groups: list[str], state_dir: Path, hooks: Hooks):
        self.u = settings
        self.device_id, self.groups = device_id, groups
        self.slots = SlotStore(state_dir)
        self.hooks = hooks
        self.trusted = [load_public_key(Path(p).read_text()) for p in self.u.public_keys]
        self._desired: dict[str, DesiredState | None] = {}  # written by paho's thread, read by ours
        self._desired_lock = threading.Lock()  # a leaf: nothing else is taken while it is held
        self._wake = threading.Event()
        self.stop = threading.Event()
        self._report: UpdateReport | None = self.slots.last_report()
        self._report_for: dict = {}  # the ids a report about to start is for (see _begin)
        self._thread = threading.Thread(target=self._run, name="edgellm-update", daemon=True)

    # -- startup ----------------------------------------------------------------------------------------
    def recover(self) -> Path | None:
        """Before the model loads: a switch that never finished its grace period is rolled back (the daemon
        died on the new model, or was killed mid-switch). Returns the folder to serve, None for model.path."""
        state = self.slots.state()
        if state.trial:
            failed = state.active
            self.slots.set_state(ActiveState(active=state.previous, previous=None, trial=None))
            if failed:
                self.slots.remove(failed)
            reason = "the daemon restarted before the new model's grace period ended (crash or kill); serving the " \
                     "previous model"
            if self._report is None or self._report.desired_id != state.trial.get("desired_id"):
                # The report on disk was lost with the crash: start one for the trial, ACTIVATING as it was.
                self._report = UpdateReport(device=self.device_id, state=S.ACTIVATING, **_ids(state.trial))
            self._set(S.ROLLED_BACK, reason=reason, finished_at=time.time())
            state = self.slots.state()
        if state.active and self.slots.path(state.active) is None:
            log.error("active slot %s is missing; serving %s", state.active, state.previous or "model.path")
            self.slots.set_state(ActiveState(active=state.previous if self.slots.path(state.previous) else None))
            state = self.slots.state()
        return self.slots.path(state.active)

    def active_bundle(self) -> dict | None:
        bundle = self.slots.bundle(self.slots.state().active)
        return {"name": bundle.name, "version": bundle.version} if bundle else None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def report(self) -> UpdateReport | None:
        return self._report

    @property
    def state(self) -> UpdateState | None:
        return self._report.state if self._report else None

    # -- desired state (MQTT thread) --------------------------------------------------------------------
    def on_desired(self, scope: str, payload: bytes) -> None:
        """`scope` is 'device' or a group name. An empty retained payload clears it."""
        desired = None
        if payload:
            try:
                desired = DesiredState.model_validate_json(payload)
            except ValidationError as e:
                log.error("ignoring an invalid desired state for %s: %s", scope, e)
                return
        with self._desired_lock:
            self._desired[scope] = desired
        self._wake.set()

    def effective(self) -> DesiredState | None:
        """A device's own desired state overrides its groups'; among groups, the first configured wins."""
        with self._desired_lock:
            for scope in ["device", *self.groups]:
                if self._desired.get(scope) is not None:
                    return self._desired[scope]
        return None

    # -- the agent thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stop.is_set():
            self._wake.wait()
            self._wake.clear()
            desired = self.effective()
            if desired is None or self.stop.is_set():
                continue
            try:
                self._follow(desired)
            except Stopped:
                log.info("update of %s %s paused for shutdown; it resumes at the next start",
                         desired.name, desired.version)
            except Exception as e:  # the agent must never take the daemon down
                log.exception("update of %s %s failed unexpectedly", desired.name, desired.version)
                if self._report is None or self._report.desired_id != desired.id or self._report.state.terminal:
                    self._begin(desired)
                self._set(S.FAILED, reason=f"internal error: {type(e).__name__}: {e}", finished_at=time.time())

    def _follow(self, desired: DesiredState) -> None:
        last = self._report
        if last is not None and last.desired_id == desired.id and last.state.terminal:
            return
        if not in_rollout(self.device_id, desired.percent):
            log.info("desired %s %s is rolled out to %g%%; this device is not in it yet", desired.name,
                     desired.version, desired.percent)
            return
        self._begin(desired)
        if self.active_bundle() == {"name": desired.name, "version": desired.version}:
            self._set(S.SUCCEEDED, reason="already running this version", finished_at=time.time())
            return
        try:
            self._update(desired, _desired_ids(desired))
        except UpdateFailed as e:
            log.error("update to %s %s: %s: %s", desired.name, desired.version, e.state, e.reason)
            self._set(e.state, reason=e.reason, finished_at=time.time())

    def _begin(self, desired: DesiredState) -> None:
        """QUEUED: a new report for a new desired id; an update paused by a shutdown resumes its own."""
        last = self._report
        if last is not None and last.desired_id == desired.id and not last.state.terminal:
            self._set(S.QUEUED, reason=None)
            return
        self._report = None
        self._report_for = _desired_ids(desired)
        self._set(S.QUEUED)

    def _update(self, desired: DesiredState, ids: dict) -> None:
        fetcher = Fetcher(desired.store_url, FetchOptions(self.u.retries, self.u.retry_backoff, self.u.timeout,
                                                          self.u.max_bytes_per_second), self.stop)
        manifest, body, signature = self._verified_manifest(fetcher, desired)
        self._refuse_downgrade(manifest, desired)
        self._download(fetcher, manifest)
        self._set(S.VERIFYING)
        try:
            slot = self.slots.assemble(manifest, body, signature, check=self._check_stop)
        except (OSError, ValueError) as e:
            raise UpdateFailed(S.FAILED, f"assembling the model: {e}") from None
        self._set(S.TESTING)
        problem = self._smoke_test(slot)
        if problem:
            self.slots.remove(slot.name)
            raise UpdateFailed(S.ROLLED_BACK, f"smoke test: {problem}")
        self._activate(slot, ids)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _verified_manifest(self, fetcher: Fetcher, desired: DesiredState) -> tuple[BundleManifest, bytes, bytes]:
        try:
            return fetch_signed(fetcher.get_bytes, desired.name, desired.version, self.trusted)
        except FetchError as e:
            raise UpdateFailed(S.FAILED, f"download: {e}") from None
        except EdgeError as e:
            raise UpdateFailed(S.FAILED, e.message) from None

    def _refuse_downgrade(self, manifest: BundleManifest, desired: DesiredState) -> None:
        """An old signed bundle stays validly signed forever: replaying its desired state must not take the
        device back to it (TUF's rollback attack). Going back on purpose takes a publication that a release
        key signed as a downgrade (`edgellm bundle publish --allow-downgrade`)."""
        active = self.slots.bundle(self.slots.state().active)
        if active is None or not is_older(manifest, active):
            return
        if desired.allow_downgrade is not None:
            try:
                verify_signature(downgrade_statement(desired), desired.allow_downgrade, self.trusted,
                                 "the desired state's downgrade permission")
                log.warning("downgrading %s from %s to %s, as a signed desired state allows", manifest.name,
                            active.version, manifest.version)
                return
            except EdgeError as e:
                raise UpdateFailed(S.FAILED, f"downgrade refused: {e.message}") from None
        raise UpdateFailed(S.FAILED, f"downgrade refused: {manifest.name} {manifest.version} is older than the "
                           f"active {active.version}. A replayed desired state cannot take a device back; to roll "
                           "back on purpose, publish with `edgellm bundle publish --allow-downgrade --key KEY`")

    def _download(self, fetcher: Fetcher, manifest: BundleManifest) -> None:
        missing = self.slots.missing_chunks(manifest)
        total = sum(manifest.unique_chunks().values())
        progress = {"done": self.slots.downloaded_bytes(manifest, missing), "next_report": 0.0}

        def report(force: bool = False) -> None:
            now = time.monotonic()
            if force or now >= progress["next_report"]:
                progress["next_report"] = now + 0.5
                # bytes_transferred: what this run fetched over the network (a resumed run counts its own)
                self._set(S.DOWNLOADING, bytes_done=progress["done"], bytes_total=total,
                          bytes_transferred=fetcher.transferred, full_bytes=manifest.total_bytes)

        def on_bytes(n: int) -> None:
            progress["done"] += n
            report()

        fetcher.on_bytes = on_bytes
        report(force=True)

        def fetch(sha: str, size: int) -> None:
            part = self.slots.downloads / f"{sha}.part"
            progress["done"] -= part.stat().st_size if part.exists() else 0  # resumed bytes count once
            try:
                fetcher.get_chunk(chunk_path(sha), self.slots.downloads / sha, sha, size)
            except FetchError as e:
                raise UpdateFailed(S.FAILED, f"download: {e}") from None
            progress["done"] += part.stat().st_size if part.exists() else 0

        deltas, local = manifest.deltas(), self.slots.local_chunks()
        for sha in self._remerge(manifest, missing, local, fetch):
            progress["done"] += missing.pop(sha)
        for sha, size in missing.items():
            if (self.slots.downloads / sha).is_file():  # fetched already (the factors of a remerge)
                continue
            delta = deltas.get(sha)
            if delta is not None and delta.base in local and self._from_delta(fetcher, sha, size, delta, local):
                progress["done"] += size - delta.size  # the delta's bytes were counted as they came
                continue
            fetch(sha, size)
        progress["done"] = total
        report(force=True)

    def _remerge(self, manifest: BundleManifest, missing: dict[str, int], local: dict,
                 fetch: Callable[[str, int], None]) -> list[str]:
        """Compute the missing chunks of re-merged weights (edgellm/daemon/update/remerge.py) from the parent's
        blocks this device holds and the LoRA's factors, fetched first; the chunks made, each checked against
        its sha256. A weight that cannot be computed here is left to the fetch that follows."""
        plan = manifest.remerge
        factors_file = next((f for f in manifest.files if plan and f.path == plan.factors), None)
        if factors_file is None:
            return []
        usable = [w for w in plan.weights if all(p.sha256 in local for ps in w.base.values() for p in ps)]
        if not usable:
            return []
        for c in factors_file.chunks:
            if c.sha256 in missing and not (self.slots.downloads / c.sha256).is_file():
                fetch(c.sha256, c.size)
        try:
            factors = load_factors(b"".join(self.slots.chunk_bytes(c.sha256, c.size, local)
                                            for c in factors_file.chunks))
        except Exception as e:  # a signed file that does not parse: fetch the weights instead
            log.warning("remerge: %s is unreadable (%s); fetching the tuned weights", plan.factors, e)
            return []
        made: set[str] = set()
        places = {f.path: list(zip(itertools.accumulate([0] + [c.size for c in f.chunks]), f.chunks, strict=False))
                  for f in manifest.files}
        for weight in usable:
            self._check_stop()
            try:
                parts = compute_weight(weight, factors, lambda p: self.slots.piece_bytes(p, local))
            except (KeyError, ValueError) as e:
                log.warning("remerge: a weight in %s cannot be computed here (%s); fetching it", weight.file, e)
                continue
            for role, start in weight.at.items():
                data = parts.get(role, b"")
                for offset, c in places.get(weight.file, []):
                    inside = start <= offset and offset + c.size <= start + len(data)
                    if inside and c.sha256 in missing and c.sha256 not in made:
                        chunk = data[offset - start: offset - start + c.size]
                        if hashlib.sha256(chunk).hexdigest() == c.sha256:
                            write_atomic(self.slots.downloads / c.sha256, chunk)
                            made.add(c.sha256)
        log.info("remerge: %d chunks computed from the parent's blocks and the LoRA's factors", len(made))
        return sorted(made)

    def _from_delta(self, fetcher: Fetcher, sha: str, size: int, delta: Delta, local: dict) -> bool:
        """Rebuild a changed chunk from its delta and the chunk this device holds; False (then the whole chunk
        is fetched) when the delta is missing or does not rebuild it."""
        try:
            data = fetcher.get_bytes(delta_path(sha, delta.base), limit=delta.size)
        except FetchError as e:
            log.warning("delta for chunk %s…: %s; fetching the chunk whole", sha[:12], e)
            return False
        path, offset = local[delta.base]
        with open(path, "rb") as f:
            f.seek(offset)
            base = f.read(size)  # a delta joins chunks of one size
        chunk = apply_delta(data, base, sha)
        if chunk is None:
            log.warning("delta for chunk %s… does not rebuild it; fetching the chunk whole", sha[:12])
            return False
        write_atomic(self.slots.downloads / sha, chunk)
        return True

    def _smoke_test(self, slot: Path) -> str | None:
        """Run edgellm.daemon.update.smoke in a child process; its crash or hang is the model's failure, not
        ours. A shutdown stops it, and the next start tests the assembled slot again."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill up
            child = subprocess.Popen([sys.executable, "-m", "edgellm.daemon.update.smoke", str(slot), "--threads",
                                      "1"], stdout=out, stderr=err, text=True)
            deadline = time.monotonic() + self.u.smoke_timeout
            while child.poll() is None:
                if self.stop.wait(0.2) or time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    if self.stop.is_set():
                        raise Stopped()
                    return f"did not finish within {self.u.smoke_timeout:g} s"
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        lines = stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            result = {}
        if child.returncode == 0 and result.get("ok"):
            log.info("smoke test passed: %s", result)
            return None
        if result.get("problems"):
            return "; ".join(result["problems"])
        return f"the test process exited with status {child.returncode}: {stderr.strip()[-300:]}"

    def _activate(self, slot: Path, ids: dict) -> None:
        self._set(S.ACTIVATING)
        before = self.slots.state()
        self.slots.set_state(ActiveState(active=slot.name, previous=before.active, trial=ids))
        errors_before = self.hooks.internal_errors()
        problem = None
        try:
            self.hooks.activate(slot)
            problem = self.hooks.health_problem()
        except EdgeError as e:
            problem = f"loading: {e.message}"
        deadline = time.monotonic() + self.u.grace_seconds
        while problem is None and time.monotonic() < deadline:
            if self.stop.wait(0.2):
                raise Stopped()  # the trial stays set: the next start rolls back, as after a crash
            if self.hooks.internal_errors() > errors_before:
                problem = "requests failed with internal errors on the new model"
        if problem is not None:
            self.slots.set_state(ActiveState(active=before.active, previous=None, trial=None))
            self.hooks.activate(self.slots.path(before.active))
            self.slots.remove(slot.name)
            raise UpdateFailed(S.ROLLED_BACK, f"health check after the switch: {problem}")
        self.slots.set_state(ActiveState(active=slot.name, previous=before.active, trial=None))
        self.slots.collect_garbage()
        self._set(S.SUCCEEDED, reason=None, finished_at=time.time())

    # -- reports ----------------------------------------------------------------------------------------
    def _set(self, state: UpdateState, **fields) -> None:
        """Move to `state` (checked against the transition table) and publish the report. State changes are
        also written to disk (progress updates are not), so a restart knows where the update stood."""
        last = self._report
        check_transition(last.state if last else None, state)
        now = time.time()
        if last is None:
            report = UpdateReport(device=self.device_id, state=state, started_at=now, **self._report_for, **fields)
        else:
            report = last.model_copy(update={"state": state, **fields})
        report.history = {**report.history, state: report.history.get(state, now)}
        report.ts = now
        self._report = report
        if last is None or state != last.state:
            self.slots.save_report(report)
        self.hooks.publish(report)


def _desired_ids(desired: DesiredState) -> dict:
    return {"desired_id": desired.id, "name": desired.name, "version": desired.version}


def _ids(trial: dict) -> dict:
    return {k: trial.get(k) for k in ("desired_id", "name", "version")}

