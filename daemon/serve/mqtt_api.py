"""The MQTT v5 face of the daemon: topics, request/response, presence, telemetry (docs/mqtt-api.md).

paho runs the network thread; requests go to the Worker, status and cancel are answered on the spot.
QoS 1 messages are acknowledged by hand: a request that arrives while we shut down stays unacknowledged,
so the broker hands it to us again in our persistent session after the restart. A request for the worker is
written to the journal (daemon/serve/journal.py) before it is acknowledged, so a crash cannot lose it either.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgellm.daemon import __version__
from edgellm.daemon.errors import CommandError, EdgeError
from edgellm.daemon.serve.journal import MAX_ATTEMPTS, Entry, RequestJournal
from edgellm.daemon.serve.jsontext import encode_json
from edgellm.daemon.serve.replies import Event, Failed, TextDelta
from edgellm.daemon.serve.reply_address import reply_topic_problem
from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.serve.stats import Stats
from edgellm.daemon.serve.wire import Incoming, error_reply, parse_request, render
from edgellm.daemon.serve.worker import Job, Worker
from edgellm.daemon.update.states import UpdateReport

log = logging.getLogger("edgellm.mqtt")
WORKER_METHODS = ("generate", "chat", "embed", "ingest", "search", "ask", "delete")  # status and cancel: at once


class Topics:
    def __init__(self, root: str, device: str, groups: list[str]):
        self.root, self.device, self.groups = root, device, groups
        self.rpc = f"{root}/{device}/rpc/+"
        self.group_rpc = [f"$share/{g}/{root}/groups/{g}/rpc/+" for g in groups]
        self.status = f"{root}/{device}/status"
        self.telemetry = f"{root}/{device}/telemetry"
        self.update = f"{root}/{device}/update"
        self.reload = f"{root}/{device}/command/reload"  # Home Assistant's "Reload model" button
        # desired-state topic -> scope: 'device' for our own, else the group's name
        self.desired = {f"{root}/{device}/desired": "device", **{f"{root}/groups/{g}/desired": g for g in groups}}

    @staticmethod
    def method(topic: str) -> str:
        return topic.rsplit("/", 1)[-1]


def set_nodelay(sock: socket.socket) -> None:
    """paho never sets TCP_NODELAY: without it a QoS 1 round trip costs 40-90 ms of Nagle + delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def make_client(settings: Settings, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    """A v5 client with credentials, TLS, TCP_NODELAY and reconnect backoff from the settings."""
    m = settings.mqtt
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                         manual_ack=manual_ack)
    if m.username:
        client.username_pw_set(m.username, settings.mqtt_password())
    if m.tls.enabled:
        client.tls_set(ca_certs=str(m.tls.ca_file) if m.tls.ca_file else None,
                       certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                       keyfile=str(settings.tls_key_file()) if settings.tls_key_file() else None,
                       cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(m.tls.insecure)
    client.reconnect_delay_set(min_delay=max(1, round(m.reconnect_min_delay)), max_delay=round(m.reconnect_max_delay))
    client.on_socket_open = lambda _c, _u, sock: set_nodelay(sock)
    client.max_queued_messages_set(0)  # QoS 1 replies made while the broker is away wait for the reconnect
    return client


def connect_client(client: mqtt.Client, settings: Settings, **kwargs) -> None:
    """Connect a command-line client (request, publish, fleet status) at once, or say which setting to fix."""
    m = settings.mqtt
    try:
        client.connect(m.host, m.port, **kwargs)
    except OSError as e:
        raise CommandError(f"mqtt.host/mqtt.port (--mqtt-host/--mqtt-port): cannot reach the broker at "
                           f"{m.host}:{m.port}: {e.strerror or e}") from None


class MqttReply:
    """Replies to one request: its Response Topic (or payload reply_to) with its Correlation Data echoed.
    `on_final` gets the final reply's MQTTMessageInfo, so the journal can mark the request done once the broker
    has it."""

    def __init__(self, client: mqtt.Client, topic: str, correlation: bytes | None,
                 on_final: Callable[[mqtt.MQTTMessageInfo], None] | None = None):
        self._client, self._topic, self._on_final = client, topic, on_final
        self._props = Properties(PacketTypes.PUBLISH)
        self._props.ContentType = "application/json"
        if correlation is not None:
            self._props.CorrelationData = correlation

    def send(self, request_id: str, event: Event) -> None:
        """The worker's sink: render the event as MQTT JSON and publish it."""
        self._publish(render(request_id, event), final=not isinstance(event, TextDelta))

    def final(self, message: dict[str, Any]) -> None:
        """A final reply made here (status, cancel, a refused request)."""
        self._publish(message, final=True)

    def _publish(self, message: dict[str, Any], final: bool) -> None:
        info = self._client.publish(self._topic, encode_json(message), qos=1, properties=self._props)
        if final and self._on_final is not None:
            self._on_final(info)


class Deliveries:
    """Final replies whose requests are journaled, until the broker acknowledges them (PUBACK).

    paho calls on_publish with a packet id, possibly before `publish()` has returned its info to us; so a
    reply acknowledged that early is caught when it is tracked, or by `sweep()`, which the serving loop calls
    every few seconds. A reply published while the broker is away (rc MQTT_ERR_NO_CONN) stays queued in paho
    and is sent at the reconnect; its entry is finished by that PUBACK. paho's `is_published()` raises for
    such a message forever after, so it is asked only of messages that were sent at once.
    """

    def __init__(self, journal: RequestJournal):
        self.journal = journal
        self._lock = threading.Lock()
        self._waiting: dict[int, list[tuple[int, mqtt.MQTTMessageInfo]]] = {}

    @staticmethod
    def _published(info: mqtt.MQTTMessageInfo) -> bool:
        return info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()

    def track(self, row: int, info: mqtt.MQTTMessageInfo) -> None:
        if self._published(info):
            self.journal.finish(row)
            return
        with self._lock:
            self._waiting.setdefault(info.mid, []).append((row, info))

    def acknowledged(self, mid: int) -> None:
        with self._lock:
            done = self._waiting.pop(mid, [])
        for row, _ in done:
            self.journal.finish(row)

    def sweep(self) -> None:
        with self._lock:
            done = [(mid, e) for mid, entries in self._waiting.items() for e in entries if self._published(e[1])]
            for mid, entry in done:
                self._waiting[mid].remove(entry)
                if not self._waiting[mid]:
                    del self._waiting[mid]
        for _, (row, _) in done:
            self.journal.finish(row)

    @property
    def waiting(self) -> int:
        """Final replies not yet acknowledged by the broker."""
        with self._lock:
            return sum(len(entries) for entries in self._waiting.values())


@dataclass
class UpdateHooks:
    on_desired: Callable[[str, bytes], None]  # (scope, retained payload)
    report: Callable[[], UpdateReport | None]  # the current update report, re-published retained on every connect


class MqttService:
    def __init__(self, settings: Settings, worker: Worker, stats: Stats, status_extra: Callable[[], dict],
                 updates: UpdateHooks | None = None, journal: RequestJournal | None = None,
                 on_reload: Callable[[], None] | None = None):
        """`on_reload`: what Home Assistant's "Reload model" button does (subscribed only when it is given)."""
        self.settings = settings
        self.on_reload = on_reload
        self.worker = worker
        self.stats = stats
        self.status_extra = status_extra
        self.updates = updates
        self.journal = journal
        self.deliveries = Deliveries(journal) if journal is not None else None
        self.topics = Topics(settings.topic_root, settings.device_id, settings.groups)
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self.last_error: str | None = None  # why the broker is unreachable, for /health
        self.state = "connecting"  # connected, unreachable (never reached since the last loss), lost
        self._failed_attempts = 0
        self._accepting = True
        self.client = make_client(settings, f"edgellm-{settings.device_id}", manual_ack=True)
        self.client.will_set(self.topics.status, self._presence("lost"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if self.deliveries is not None:
            self.client.on_publish = lambda _c, _u, mid, _rc, _p: self.deliveries.acknowledged(mid)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        m = self.settings.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = m.session_expiry
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive, clean_start=False, properties=props)
        self.replay()
        self.client.loop_start()

    def replay(self) -> None:
        """Run again what the journal owns but never answered (the daemon was killed). Their replies wait in
        the client until the connection is up."""
        if self.journal is None:
            return
        entries = self.journal.pending()
        if entries:
            log.warning("replaying %d request(s) received before the last stop but never answered", len(entries))
        for entry in entries:
            problem = reply_topic_problem(entry.response_topic)
            if problem is None and entry.attempts >= MAX_ATTEMPTS:
                problem = f"it was in flight at {entry.attempts} stops in a row"
            if problem is not None:
                self._set_aside(entry, problem)
                continue
            self.journal.attempt(entry.row)
            incoming = parse_request(Topics.method(entry.topic), entry.payload)
            reply = self._reply(entry.response_topic, entry.correlation, entry.row)
            self._dispatch(Topics.method(entry.topic), incoming, reply, entry.deadline_at, replayed=True)

    def _set_aside(self, entry: Entry, problem: str) -> None:
        """A dead letter: kept in the journal, never run again; its client is told, where it can be."""
        self.journal.set_aside(entry.row, problem)
        self.stats.dead_letter()
        log.error("request %d on %s set aside as a dead letter, not run again: %s", entry.row, entry.topic, problem)
        if reply_topic_problem(entry.response_topic) is None:
            incoming = parse_request(Topics.method(entry.topic), entry.payload)
            error = EdgeError("internal", f"this request was set aside and will not be run again: {problem}")
            self._reply(entry.response_topic, entry.correlation).final(error_reply(incoming.id, error))

    def stop_intake(self) -> None:
        """Stop taking requests: group requests go to other members; ours wait in the broker session."""
        self._accepting = False
        if self.topics.group_rpc and self.connected.is_set():
            self.client.unsubscribe(self.topics.group_rpc)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish 'offline' (retained), wait for it and the last replies, then disconnect cleanly. Whatever state
        the broker is in (never reached, gone mid-session), this returns: a shutdown never fails on it."""
        try:
            info = self.client.publish(self.topics.status, self._presence("offline"), qos=1, retain=True)
            deadline = time.monotonic() + timeout
            while (time.monotonic() < deadline and self.connected.is_set()
                   and (not Deliveries._published(info) or self._unacked())):
                time.sleep(0.02)
        except (RuntimeError, ValueError, OSError) as e:  # paho: "Message publish failed" without a connection
            log.info("stopping without a broker: the 'offline' presence was not published (%s)", e)
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = self.settings.mqtt.session_expiry
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        if self.deliveries is not None:
            self.deliveries.sweep()
            self.journal.close()

    def _unacked(self) -> int:
        return self.deliveries.waiting if self.deliveries is not None else 0

    # -- presence and telemetry ------------------------------------------------------------------------
    def _presence(self, state: str) -> bytes:
        body = {"state": state, "device": self.settings.device_id, "version": __version__, "ts": time.time()}
        if state == "online":
            body.update(self.status_extra())
            body["groups"] = self.settings.groups
            body["uptime_s"] = self.stats.snapshot()["uptime_s"]
        return encode_json(body)

    def publish_status(self) -> None:
        self.client.publish(self.topics.status, self._presence("online"), qos=1, retain=True)

    def publish_update(self, report: UpdateReport) -> None:
        self.client.publish(self.topics.update, report.model_dump_json().encode(), qos=1, retain=True)

    def publish_telemetry(self) -> None:
        """Retained, so a dashboard (Home Assistant) has the last values the moment it subscribes."""
        body = {"device": self.settings.device_id, "ts": time.time(), "queue_depth": self.worker.depth,
                **self.stats.snapshot()}
        self.client.publish(self.topics.telemetry, encode_json(body), qos=0, retain=True)

    def publish_discovery(self) -> None:
        ha = self.settings.homeassistant
        if not ha.enabled:
            return
        from edgellm.daemon.serve.homeassistant import discovery_messages

        t = self.topics
        messages = discovery_messages(ha.discovery_prefix, self.settings.device_id,
                                      {"status": t.status, "telemetry": t.telemetry, "update": t.update,
                                       "reload": t.reload}, updates=self.updates is not None)
        for topic, payload in messages.items():
            self.client.publish(topic, payload, qos=1, retain=True)

    # -- paho callbacks (network thread) ---------------------------------------------------------------
    def _on_connect(self, client, _userdata, flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        log.info("connected to %s:%s (session present: %s)", self.settings.mqtt.host, self.settings.mqtt.port,
                 flags.session_present)
        subs = [(self.topics.rpc, SubscribeOptions(qos=1))]
        if self._accepting:
            subs += [(t, SubscribeOptions(qos=1)) for t in self.topics.group_rpc]
        if self.updates is not None:
            subs += [(t, SubscribeOptions(qos=1)) for t in self.topics.desired]
        if self.on_reload is not None:
            subs.append((self.topics.reload, SubscribeOptions(qos=1)))
        client.subscribe(subs)
        self.publish_status()
        self.publish_discovery()
        self.publish_telemetry()
        if self.updates is not None and (report := self.updates.report()) is not None:
            self.publish_update(report)
        self.last_error, self._failed_attempts, self.state = None, 0, "connected"
        self.connected.set()
        self.ever_connected.set()

    def _on_connect_fail(self, _client, _userdata) -> None:
        """paho calls this once per failed attempt, and attempts are spaced by the reconnect backoff."""
        self._failed_attempts += 1
        self.state = "unreachable"
        m = self.settings.mqtt
        self.last_error = f"cannot reach the broker at {m.host}:{m.port} ({self._failed_attempts} attempt(s))"
        log.warning("%s; retrying with backoff up to %g s", self.last_error, m.reconnect_max_delay)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        self.connected.clear()
        if reason_code.is_failure or reason_code.value != 0:
            self.last_error, self.state = f"lost the broker: {reason_code}", "lost"
            log.warning("lost the broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, _userdata, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            return  # left unacknowledged: the broker redelivers it to our next session
        acked = False

        def ack() -> None:
            """Acknowledge before anything is published for this message: should a reply make the broker drop
            the connection, the request is then not redelivered at the reconnect to do it again."""
            nonlocal acked
            if msg.qos > 0 and not acked:
                client.ack(msg.mid, msg.qos)
            acked = True

        try:
            if msg.topic in self.topics.desired:
                if self.updates is not None:
                    self.updates.on_desired(self.topics.desired[msg.topic], msg.payload)
            elif msg.topic == self.topics.reload:
                if self.on_reload is not None and not msg.retain:  # a retained press would reload at each connect
                    log.info("reload requested on %s", msg.topic)
                    self.on_reload()
            else:
                self._handle(msg, ack)
        except Exception:  # never let one message take the network thread down
            log.exception("unexpected error handling a message on %s", msg.topic)
        finally:
            ack()

    def _reply(self, topic: str, correlation: bytes | None, row: int | None = None) -> MqttReply:
        on_final = None
        if row is not None and self.deliveries is not None:
            def on_final(info: mqtt.MQTTMessageInfo) -> None:
                self.deliveries.track(row, info)
        return MqttReply(self.client, topic, correlation, on_final)

    def _handle(self, msg: mqtt.MQTTMessage, ack: Callable[[], None]) -> None:
        """Parse once, answer at once what needs no worker, journal the rest before it is acknowledged."""
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None)
        expiry = getattr(props, "MessageExpiryInterval", None)
        payload = msg.payload
        method = Topics.method(msg.topic)
        limit = self.settings.limits.max_payload_bytes
        if len(payload) > limit:
            incoming = Incoming(error=EdgeError("too_large", f"payload is {len(payload)} bytes; the limit is {limit}"))
        else:
            incoming = parse_request(method, payload)
        reply_topic = getattr(props, "ResponseTopic", None) or incoming.reply_to
        if (problem := reply_topic_problem(reply_topic)) is not None:
            self.stats.lost()
            log.warning("request on %s cannot be answered: its reply address %r is unusable (%s); dropped",
                        msg.topic, (reply_topic or "")[:200], problem)
            return
        now = time.time()
        deadlines = [now + s for s in (expiry, incoming.request and incoming.request.deadline_ms
                                       and incoming.request.deadline_ms / 1000) if s]
        deadline_at = min(deadlines) if deadlines else None
        row = None
        if self.journal is not None and incoming.error is None and method in WORKER_METHODS:
            entry = Entry(msg.topic, payload, reply_topic, correlation, now, deadline_at)
            if msg.dup and self.journal.seen(entry):
                log.info("request on %s redelivered by the broker: already owned, not run twice", msg.topic)
                return
            row = self.journal.record(entry)
        ack()
        self._dispatch(method, incoming, self._reply(reply_topic, correlation, row), deadline_at)

    def _dispatch(self, method: str, incoming: Incoming, reply: MqttReply, deadline_at: float | None,
                  replayed: bool = False) -> None:
        if incoming.error is not None:
            self.stats.error(incoming.error.code)
            reply.final(error_reply(incoming.id, incoming.error))
            log.info("%s id=%s error=%s", method, incoming.id or "-", incoming.error.code)
            return
        request = incoming.request
        request_id = request.id or uuid.uuid4().hex[:16]
        if method == "status":
            self.stats.request(method)
            reply.final({"type": "result", "ok": True, "id": request_id, **self.status()})
            return
        if method == "cancel":
            self.stats.request(method)
            found = self.worker.cancel(request.request_id)
            reply.final({"type": "result", "ok": True, "id": request_id, "cancelled": found})
            return
        deadline = None if deadline_at is None else time.monotonic() + (deadline_at - time.time())
        job = Job(method, request, request_id, reply, deadline=deadline)
        try:
            self.worker.submit(job, replayed=replayed)
        except EdgeError as e:
            self.stats.request(method)
            self.stats.error(e.code)
            job.finish(Failed(e))

    def status(self) -> dict[str, Any]:
        return {"state": "online" if self._accepting else "stopping", "device": self.settings.device_id,
                "version": __version__, "queue_depth": self.worker.depth, **self.status_extra(),
                "sequences": self.worker.models.served.generator.sequences(),
                **self.stats.snapshot()}
