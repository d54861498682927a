"""`edgellm serve`: load the model, connect, serve until SIGTERM; SIGHUP reloads what is safe to reload."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from edgellm.daemon.errors import CommandError, EdgeError
from edgellm.daemon.serve.journal import RequestJournal
from edgellm.daemon.serve.logs import configure_logging
from edgellm.daemon.serve.mqtt_api import MqttService, UpdateHooks
from edgellm.daemon.serve.runtime import DaemonRecord, MqttRecord, RuntimeFile, ServedModelRecord
from edgellm.daemon.serve.sdnotify import Watchdog, notify
from edgellm.daemon.serve.served import ServedModels, load_generator, load_served
from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.serve.stats import Stats
from edgellm.daemon.serve.worker import Worker
from edgellm.daemon.update.agent import Hooks, UpdateAgent
from edgellm.daemon.update.states import UpdateReport

log = logging.getLogger("edgellm.serve")
JOURNAL_FILE = "requests.db"
SWEEP_SECONDS = 2.0  # how often replies acknowledged before we tracked them are marked done in the journal
PRUNE_SECONDS = 60.0  # how often done journal entries older than an hour are deleted (it would grow forever)


class Daemon:
    def __init__(self, settings: Settings, reload_settings: Callable[[], Settings]):
        self.settings = settings
        self.reload_settings = reload_settings
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.model_reload_requested = threading.Event()  # the Home Assistant button: load the model again too
        self.stats = Stats()
        self.mqtt: MqttService | None = None
        self.updater = self._update_agent(settings) if settings.update.enabled else None
        served_path = self.updater.recover() if self.updater else None
        notify(f"STATUS=loading {served_path or settings.model.path}")
        try:
            self.models = ServedModels(load_served(self._serving(served_path)))
        except EdgeError as e:
            raise CommandError(e.message) from None
        self.watchdog = Watchdog()
        self.worker = Worker(self.models, self.stats, settings.limits.queue_size, settings.limits.max_tokens,
                             heartbeat=self.watchdog.ping, store_settings=settings.store,
                             concurrency=settings.model.batch_size)
        if settings.mqtt.enabled:
            hooks = UpdateHooks(self.updater.on_desired, lambda: self.updater.report) if self.updater else None
            try:
                journal = RequestJournal(settings.state_dir / JOURNAL_FILE)
            except (OSError, sqlite3.Error) as e:
                raise CommandError(f"state_dir: cannot keep the request journal in {settings.state_dir}: {e}") from None
            on_reload = self.model_reload_requested.set if settings.homeassistant.enabled else None
            self.mqtt = MqttService(settings, self.worker, self.stats, self.model_status, hooks, journal, on_reload)
        self.runtime = RuntimeFile()
        self.http = None
        if settings.http.enabled:
            from edgellm.daemon.serve.http.app import create_app
            from edgellm.daemon.serve.http.transport import HttpServer
            from edgellm.daemon.serve.metrics import Metrics

            metrics = Metrics(self.stats, lambda: self.worker.depth, lambda: self.models.served.model_info,
                              update_state=lambda: (self.updater.state if self.updater else None) or "none")
            self.http = HttpServer(create_app(settings, self.worker, self.models, metrics, self.mqtt_health),
                                   settings)

    def _serving(self, folder: Path | None, settings: Settings | None = None) -> Settings:
        """The settings with model.path pointing at the folder the update agent activated, if any."""
        settings = settings or self.settings
        if folder is None:
            return settings
        return settings.model_copy(update={"model": settings.model.model_copy(update={"path": folder})})

    def _update_agent(self, settings: Settings) -> UpdateAgent:
        hooks = Hooks(publish=self._publish_update, activate=self.switch_model,
                      health_problem=self.health_problem,
                      internal_errors=lambda: self.stats.snapshot()["errors"].get("internal", 0))
        try:
            return UpdateAgent(settings.update, settings.device_id, settings.groups, settings.update_dir(), hooks)
        except (OSError, ValueError) as e:
            raise CommandError(f"update.public_keys: cannot read an Ed25519 public key: {e}") from None

    def _publish_update(self, report: UpdateReport) -> None:
        if self.mqtt is not None:  # before the connection, the report goes out on connect
            self.mqtt.publish_update(report)
            self.mqtt.publish_status()  # the retained presence carries update_state: keep it current

    def mqtt_health(self) -> dict:
        """The broker connection as /health reports it ("disabled" on an HTTP-only device: not a fault)."""
        if self.mqtt is None:
            return {"connected": False, "state": "disabled"}
        connected = self.mqtt.connected.is_set()
        return {"connected": connected, "state": "connected" if connected else self.mqtt.state,
                "broker": f"{self.settings.mqtt.host}:{self.settings.mqtt.port}",
                "error": None if connected else self.mqtt.last_error}

    def switch_model(self, folder: Path | None) -> None:
        """Serve another model folder; requests already running finish on the one they started with."""
        folder = folder or self.settings.model.path
        self.models.swap_generator(load_generator(self.settings, folder))
        log.info("now serving %s from %s", self.models.served.model_info.name, folder)
        self.write_runtime()
        if self.mqtt is not None:
            self.mqtt.publish_status()

    def health_problem(self) -> str | None:
        """The new model answers its first golden prompt as the host recorded it. It goes through the serving
        Generator like any request (its scheduler owns every pass), as a solo sequence: computed as alone, so
        requests batched meanwhile cannot move its greedy answer."""
        from edgellm.daemon.update.smoke import golden_problem

        bundle = self.updater.slots.bundle(self.updater.slots.state().active)
        if bundle is None or not bundle.smoke.golden:
            return None
        return golden_problem(self.models.served.generator, bundle.smoke.golden[0], 1)

    def write_runtime(self) -> None:
        """Tell `edgellm ps`, `run` and `models rm` what this process serves (serve/runtime.py)."""
        served, s = self.models.served, self.settings

        def record(manifest, folder: Path, loaded_at: float) -> ServedModelRecord:
            return ServedModelRecord(name=manifest.name, version=manifest.version, folder=str(folder.resolve()),
                                     loaded_at=loaded_at)

        embedder = served.embedder
        self.runtime.write(DaemonRecord(
            pid=os.getpid(), started_at=self.runtime.started_at,
            model=record(served.generator.model.manifest, served.generator.model.folder, served.loaded_at),
            embedding_model=record(embedder.manifest, embedder.folder, served.loaded_at) if embedder else None,
            http_url=f"http://{s.http.host}:{s.http.port}" if self.http is not None else None,
            http_key_required=self.http is not None and s.http.key() is not None,
            mqtt=MqttRecord(host=s.mqtt.host, port=s.mqtt.port, topic_root=s.topic_root, device_id=s.device_id)
            if self.mqtt is not None else None))

    def model_status(self) -> dict:
        served = self.models.served
        status = {"model": asdict(served.model_info)}
        if self.updater is not None:
            status["bundle"] = self.updater.active_bundle()
            status["update_state"] = self.updater.state
        if served.embedder is not None:
            status["embedding_model"] = {"name": served.embedder.name, "version": served.embedder.manifest.version}
        return status

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        self.worker.start()
        if self.mqtt is not None:
            self.mqtt.start()
        if self.updater is not None:
            self.updater.start()
        if self.http is not None:
            self.http.start()
            log.info("HTTP API on http://%s:%d (OpenAI's under /v1, Ollama's under /api)", self.settings.http.host,
                     self.settings.http.port)
        if self.mqtt is not None:
            notify(f"STATUS=connecting to {self.settings.mqtt.host}:{self.settings.mqtt.port}")
        else:
            log.info("MQTT is off (mqtt.enabled false): HTTP only")
        self.write_runtime()
        ready = False
        next_telemetry = time.monotonic() + self.settings.telemetry_interval
        next_sweep = time.monotonic() + SWEEP_SECONDS
        next_prune = time.monotonic() + PRUNE_SECONDS
        while not self.stop_requested.wait(0.2):
            if not ready and (self.mqtt is None or self.mqtt.ever_connected.is_set()):
                ready = True
                notify(f"READY=1\nSTATUS=serving {self.model_status()['model']['name']}")
                log.info("serving %s as %s", self.model_status()["model"]["name"], self.settings.device_id)
            if self.reload_requested.is_set() or self.model_reload_requested.is_set():
                model_too = self.model_reload_requested.is_set()
                self.reload_requested.clear()
                self.model_reload_requested.clear()
                self.reload(model_too)
            if self.mqtt is None:
                continue
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_SECONDS
                self.mqtt.deliveries.sweep()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_SECONDS
                self.mqtt.journal.prune()
            if time.monotonic() >= next_telemetry:
                next_telemetry = time.monotonic() + self.settings.telemetry_interval
                if self.mqtt.connected.is_set():
                    self.mqtt.publish_telemetry()
        return self.shutdown()

    def shutdown(self) -> int:
        notify("STOPPING=1\nSTATUS=finishing in-flight requests")
        log.info("stopping: %d request(s) in flight, %.0f s grace", self.worker.depth,
                 self.settings.limits.grace_seconds)
        if self.mqtt is not None:
            self.mqtt.stop_intake()
        if self.updater is not None:
            self.updater.shutdown()
        if self.http is not None:
            self.http.stop_intake()
        self.worker.drain(self.settings.limits.grace_seconds)
        if self.http is not None:
            self.http.join()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.runtime.remove()
        log.info("stopped")
        return 0

    def reload(self, model_too: bool = False) -> None:
        """Apply the new configuration where that is safe; MQTT connection settings need a restart. `model_too`
        loads the models again even if their settings did not change (the files on disk may have)."""
        notify("RELOADING=1")
        try:
            new = self.reload_settings()
        except CommandError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            notify("READY=1")
            return
        old = self.settings
        if model_too or (new.model, new.embedding, new.store.path) != (old.model, old.embedding, old.store.path):
            try:
                active = self.updater.slots.path(self.updater.slots.state().active) if self.updater else None
                self.models.swap(load_served(self._serving(active, new)))
                self.write_runtime()
                log.info("now serving %s", self.model_status()["model"]["name"])
            except EdgeError as e:
                log.error("reload: cannot load the new model, keeping the old one: %s", e.message)
                new = new.model_copy(update={"model": old.model, "embedding": old.embedding, "store": old.store})
        if (new.mqtt, new.device_id, new.groups, new.topic_root, new.http) != (
                old.mqtt, old.device_id, old.groups, old.topic_root, old.http):
            log.warning("reload: MQTT, HTTP, device and group settings take effect at the next restart")
            new = new.model_copy(update={"mqtt": old.mqtt, "device_id": old.device_id, "groups": old.groups,
                                         "topic_root": old.topic_root, "http": old.http})
        if new.model.batch_size != old.model.batch_size:
            log.warning("reload: model.batch_size sizes the new KV pool now; the number of requests run at once "
                        "changes at the next restart")
        self.worker.reconfigure(new.limits.queue_size, new.limits.max_tokens, new.store)
        logging.getLogger().setLevel(new.log_level)
        self.settings = new
        if self.mqtt is not None:
            self.mqtt.settings = new
            self.mqtt.publish_status()
        notify(f"READY=1\nSTATUS=serving {self.model_status()['model']['name']}")


def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    configure_logging(settings.log_level, settings.log_format)
    if settings.model.path is None:
        raise CommandError("model.path is not set: pass --model, set EDGELLM_MODEL__PATH, or [model] path in the "
                           "config file")
    from edgellm.daemon.library import resolve_model

    try:
        folder = resolve_model(settings.model.path)  # a library name works as well as a folder
    except EdgeError as e:  # a model removed (`models rm`) or never pulled: say which, and how to get it
        raise CommandError(f"model.path: {e.message}") from None
    if not folder.is_dir():
        raise CommandError(f"model.path: {settings.model.path} is not a folder; build one with "
                           "`edgellm model build`")
    return Daemon(settings, reload_settings).run()
