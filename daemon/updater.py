"""The update agent inside the daemon: follow the desired state, fetch only missing chunks, verify,
smoke-test in a child process, switch atomically, roll back on failure, and report every step.

Reports follow AWS IoT Jobs: QUEUED, DOWNLOADING, VERIFYING, TESTING, ACTIVATING, then SUCCEEDED, FAILED
(the model never became a candidate) or ROLLED_BACK (it was tested or switched to, and rejected).
"""

from __future__ import annotations

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

from daemon.bundle import (
    SIGNATURE_FILE,
    BundleManifest,
    DesiredState,
    bundle_path,
    chunk_path,
    downgrade_statement,
    in_rollout,
    is_older,
    load_public_key,
    verify_bundle,
    verify_signature,
)
from daemon.errors import EdgeError
from daemon.fetch import Fetcher, FetchError, FetchOptions, Stopped
from daemon.settings import Settings
from daemon.slots import ActiveState, SlotStore

log = logging.getLogger("edgellm.update")
TERMINAL = ("SUCCEEDED", "FAILED", "ROLLED_BACK")


class UpdateFailed(Exception):
    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


@dataclass
class Hooks:
    """What the agent needs from the running daemon."""

    publish: Callable[[dict], None]  # the retained report on {root}/{device}/update
    activate: Callable[[Path | None], None]  # serve this model folder (None: the configured model.path)
    health_problem: Callable[[], str | None]  # a golden prompt through the serving engine
    internal_errors: Callable[[], int]


class UpdateAgent:
    def __init__(self, settings: Settings, hooks: Hooks):
        self.settings = settings
        self.u = settings.update
        self.slots = SlotStore(settings.update_dir())
        self.hooks = hooks
        self.trusted = [load_public_key(Path(p).read_text()) for p in self.u.public_keys]
        self._desired: dict[str, DesiredState | None] = {}
        self._wake = threading.Event()
        self.stop = threading.Event()
        self._report: dict = self.slots.last_report()
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
            self._set(state="ROLLED_BACK", reason="the daemon restarted before the new model's grace period "
                      "ended (crash or kill); serving the previous model", **_ids(state.trial))
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
    def report(self) -> dict:
        return dict(self._report)

    # -- desired state (MQTT thread) --------------------------------------------------------------------
    def on_desired(self, scope: str, payload: bytes) -> None:
        """`scope` is 'device' or a group name. An empty retained payload clears it."""
        if not payload:
            self._desired[scope] = None
        else:
            try:
                self._desired[scope] = DesiredState.model_validate_json(payload)
            except ValidationError as e:
                log.error("ignoring an invalid desired state for %s: %s", scope, e)
                return
        self._wake.set()

    def effective(self) -> DesiredState | None:
        """A device's own desired state overrides its groups'; among groups, the first configured wins."""
        for scope in ["device", *self.settings.groups]:
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
                self._set(state="FAILED", reason=f"internal error: {type(e).__name__}: {e}", **_desired_ids(desired))

    def _follow(self, desired: DesiredState) -> None:
        last = self._report
        if last.get("desired_id") == desired.id and last.get("state") in TERMINAL:
            return
        if not in_rollout(self.settings.device_id, desired.percent):
            log.info("desired %s %s is rolled out to %g%%; this device is not in it yet", desired.name,
                     desired.version, desired.percent)
            return
        ids = _desired_ids(desired)
        if self.active_bundle() == {"name": desired.name, "version": desired.version}:
            self._set(state="SUCCEEDED", reason="already running this version", **ids)
            return
        started = time.time() if last.get("desired_id") != desired.id else last.get("started_at", time.time())
        self._set(state="QUEUED", started_at=started, reason=None, **ids)
        try:
            self._update(desired, ids)
        except UpdateFailed as e:
            log.error("update to %s %s: %s: %s", desired.name, desired.version, e.state, e.reason)
            self._set(state=e.state, reason=e.reason)

    def _update(self, desired: DesiredState, ids: dict) -> None:
        fetcher = Fetcher(desired.store_url, FetchOptions(self.u.retries, self.u.retry_backoff, self.u.timeout,
                                                          self.u.max_bytes_per_second), self.stop)
        manifest, body, signature = self._verified_manifest(fetcher, desired)
        self._refuse_downgrade(manifest, desired)
        self._download(fetcher, manifest)
        self._set(state="VERIFYING")
        try:
            slot = self.slots.assemble(manifest, body, signature, check=self._check_stop)
        except (OSError, ValueError) as e:
            raise UpdateFailed("FAILED", f"assembling the model: {e}") from None
        self._set(state="TESTING")
        problem = self._smoke_test(slot)
        if problem:
            self.slots.remove(slot.name)
            raise UpdateFailed("ROLLED_BACK", f"smoke test: {problem}")
        self._activate(slot, ids)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _verified_manifest(self, fetcher: Fetcher, desired: DesiredState) -> tuple[BundleManifest, bytes, bytes]:
        try:
            body = fetcher.get_bytes(bundle_path(desired.name, desired.version))
            signature = fetcher.get_bytes(bundle_path(desired.name, desired.version, SIGNATURE_FILE))
        except FetchError as e:
            raise UpdateFailed("FAILED", f"download: {e}") from None
        try:
            manifest = verify_bundle(body, signature, self.trusted)
        except EdgeError as e:
            raise UpdateFailed("FAILED", e.message) from None
        if (manifest.name, manifest.version) != (desired.name, desired.version):
            raise UpdateFailed("FAILED", f"bundle.json: signed for {manifest.name} {manifest.version}, but the "
                               f"desired state names {desired.name} {desired.version}")
        return manifest, body, signature

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
                raise UpdateFailed("FAILED", f"downgrade refused: {e.message}") from None
        raise UpdateFailed("FAILED", f"downgrade refused: {manifest.name} {manifest.version} is older than the "
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
                self._set(state="DOWNLOADING", bytes_done=progress["done"], bytes_total=total,
                          bytes_transferred=fetcher.transferred, full_bytes=manifest.total_bytes)

        def on_bytes(n: int) -> None:
            progress["done"] += n
            report()

        fetcher.on_bytes = on_bytes
        report(force=True)
        for sha, size in missing.items():
            part = self.slots.downloads / f"{sha}.part"
            progress["done"] -= part.stat().st_size if part.exists() else 0  # resumed bytes count once
            try:
                fetcher.get_chunk(chunk_path(sha), self.slots.downloads / sha, sha, size)
            except FetchError as e:
                raise UpdateFailed("FAILED", f"download: {e}") from None
            progress["done"] += part.stat().st_size if part.exists() else 0
        progress["done"] = total
        report(force=True)

    def _smoke_test(self, slot: Path) -> str | None:
        """Run daemon.smoke in a child process; its crash or hang is the model's failure, not ours. A shutdown
        stops it, and the next start tests the assembled slot again."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill up
            child = subprocess.Popen([sys.executable, "-m", "daemon.smoke", str(slot), "--threads", "1"],
                                     stdout=out, stderr=err, text=True)
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
        self._set(state="ACTIVATING")
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
            raise UpdateFailed("ROLLED_BACK", f"health check after the switch: {problem}")
        self.slots.set_state(ActiveState(active=slot.name, previous=before.active, trial=None))
        self.slots.collect_garbage()
        self._set(state="SUCCEEDED", reason=None, finished_at=time.time())

    # -- reports ----------------------------------------------------------------------------------------
    def _set(self, **fields) -> None:
        """Update the report and publish it; a new desired id starts a new report. State changes are also
        written to disk (progress updates are not), so a restart knows where the update stood."""
        last = self._report
        new_update = fields.get("desired_id", last.get("desired_id")) != last.get("desired_id")
        report = dict(fields) if new_update else {**last, **fields}
        now = time.time()
        state = report.get("state")
        history = dict(report.get("history") or {})
        if state and state not in history:
            history[state] = now
        report.update(device=self.settings.device_id, ts=now, history=history)
        self._report = report
        if new_update or state != last.get("state"):
            self.slots.save_report(report)
        self.hooks.publish(report)

def _desired_ids(desired: DesiredState) -> dict:
    return {"desired_id": desired.id, "name": desired.name, "version": desired.version}


def _ids(trial: dict) -> dict:
    return {k: trial.get(k) for k in ("desired_id", "name", "version")}

