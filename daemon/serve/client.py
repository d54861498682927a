"""A request/response client over MQTT v5, for `edgellm request`, the tests and the benchmarks."""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Callable
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgellm.daemon.errors import CommandError
from edgellm.daemon.serve.mqtt_api import connect_client, make_client
from edgellm.daemon.serve.settings import Settings


def rpc_topic(settings: Settings, method: str, device: str | None = None, group: str | None = None) -> str:
    if group:
        return f"{settings.topic_root}/groups/{group}/rpc/{method}"
    return f"{settings.topic_root}/{device or settings.device_id}/rpc/{method}"


class RpcClient:
    """One connection, many requests: each gets its own correlation data on one reply topic."""

    def __init__(self, settings: Settings, timeout: float = 10.0, session_expiry: int = 0,
                 client_id: str | None = None):
        """session_expiry > 0 keeps our subscription and queued replies at the broker across reconnects."""
        self.settings = settings
        self.client_id = client_id or f"edgellm-client-{uuid.uuid4().hex[:10]}"
        self.reply_topic = f"{settings.topic_root}/replies/{self.client_id}"
        self._pending: dict[bytes, tuple[threading.Event, list[dict], Callable[[dict], None] | None]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = make_client(settings, self.client_id)
        self.client.on_connect = lambda c, *_: c.subscribe([(self.reply_topic, SubscribeOptions(qos=1))])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        m = settings.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        connect_client(self.client, settings, keepalive=m.keepalive, clean_start=session_expiry == 0,
                       properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise CommandError(f"the broker at {m.host}:{m.port} did not accept our subscription in {timeout} s")

    def _on_message(self, _client, _userdata, msg) -> None:
        key = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            entry = self._pending.get(key)
        if entry is None:
            return
        done, messages, on_delta = entry
        try:
            message = json.loads(msg.payload)
        except ValueError:
            return
        if message.get("type") == "delta":
            if on_delta:
                on_delta(message)
            return
        messages.append(message)
        done.set()

    def send(self, topic: str, payload: dict[str, Any] | bytes,
             on_delta: Callable[[dict], None] | None = None, expiry_s: int | None = None) -> tuple[threading.Event,
                                                                                                 list[dict]]:
        key = uuid.uuid4().bytes
        done, messages = threading.Event(), []
        with self._lock:
            self._pending[key] = (done, messages, on_delta)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = key
        if expiry_s:
            props.MessageExpiryInterval = expiry_s
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, body, qos=1, properties=props)
        return done, messages

    def call(self, topic: str, payload: dict[str, Any] | bytes, timeout: float = 120.0,
             on_delta: Callable[[dict], None] | None = None) -> dict:
        """Send and wait for the final reply. The request expires (MQTT Message Expiry Interval) when we stop
        waiting, so a device that comes back later does not run a request nobody awaits."""
        done, messages = self.send(topic, payload, on_delta, expiry_s=max(1, math.ceil(timeout)))
        if not done.wait(timeout):
            raise CommandError(f"no reply on {topic} within {timeout:.0f} s: is the device online? "
                               f"(its status is retained on {self.settings.topic_root}/<device>/status)")
        return messages[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
