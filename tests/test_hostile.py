"""Hostile input over a real Mosquitto: reply addresses the broker would refuse, a broker outage while a reply
is due, a request that crashes the daemon twice, and a long prompt that must not hold up the rest."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import Broker, DaemonProcess, examples, rpc

TOPIC = "edgellm/v1/dev1/rpc/"
LONG = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("hostile-broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(broker, smollm2_int4, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("hostile-daemon"), broker.port, smollm2_int4,
                      env={"EDGELLM_LIMITS__MAX_TOKENS": "4096"}).start()
    yield d
    assert d.stop() == 0


def journal(d: DaemonProcess) -> list[tuple]:
    with sqlite3.connect(Path(d.env["EDGELLM_STATE_DIR"]) / "requests.db") as db:
        return db.execute("SELECT row, done_at, dead_at, dead_reason, attempts FROM requests ORDER BY row").fetchall()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class LegacyClient:
    """An MQTT 3.1.1 client: it can only say where to reply in the payload's reply_to."""

    def __init__(self, port: int):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="legacy-hostile", protocol=mqtt.MQTTv311)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, method: str, body: dict | bytes) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(TOPIC + method, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


BAD_ADDRESSES = ["x/a\u0001b", "x/\u0000", "x/\u007f", "x/\u0085", "x/\ufffe", "x/+/y", "x/#", "#", "+",
                 "$SYS/edgellm", "x/\ud800"]


def test_a_reply_address_the_broker_would_refuse_is_never_published_to(broker, daemon):
    """Publishing to `x/a\\u0001b` makes Mosquitto drop the connection as a malformed packet; before the fix the
    request came back at every reconnect and the device answered nothing else, for good."""
    with rpc(broker.port) as c:
        before = c.call(TOPIC + "status", {})["unanswerable"]
        legacy = LegacyClient(broker.port)
        try:
            for address in BAD_ADDRESSES:
                # json.dumps writes a lone surrogate as the escape \ud800: legal JSON, unencodable in UTF-8
                legacy.publish("status", {"reply_to": address, "id": "bad"})
                legacy.publish("generate", {"reply_to": address, "prompt": "Say hi.", "max_tokens": 2})
        finally:
            legacy.close()
        status = c.call(TOPIC + "status", {}, timeout=10)
    assert status["ok"] and status["unanswerable"] == before + 2 * len(BAD_ADDRESSES)
    log = daemon.log.read_text()
    assert "lost the broker" not in log, log[-2000:]
    assert "its reply address 'x/a\\x01b' is unusable (it holds the control character U+0001" in log
    assert all(done is not None or dead is not None for _, done, dead, *_ in journal(daemon))


addresses = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=40),  # control characters, wildcards, `$`, anything
    st.text(st.characters(max_codepoint=0x9F, exclude_categories=["Cs"]), min_size=1, max_size=20),
    st.sampled_from(BAD_ADDRESSES + ["", "a" * 1024, "a" * 1025, "é/ü/日本", "x/\ufdd0", "x/\U0010ffff"]))


@pytest.mark.slow
@settings(max_examples=examples(200), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(address=addresses, method=st.sampled_from(["status", "generate", "embed", "nope"]))
def test_no_reply_address_can_take_the_device_off_the_air(broker, daemon, address, method):
    legacy = LegacyClient(broker.port)
    try:
        legacy.publish(method, {"reply_to": address, "prompt": "hi", "max_tokens": 1, "input": "x"})
    finally:
        legacy.close()
    with rpc(broker.port) as c:
        assert c.call(TOPIC + "status", {}, timeout=10)["ok"]
    assert "lost the broker" not in daemon.log.read_text()


@pytest.mark.slow
def test_a_reply_made_during_a_broker_outage_is_delivered_once_and_not_again_after_a_restart(
        broker, daemon_factory):
    """paho's is_published() raises for a reply published while disconnected; before the fix its journal
    entry was never marked done, so the next start ran the request again and sent 60 deltas and a reply twice."""
    d = daemon_factory(broker.port, device="dev2").start()
    first = threading.Event()
    deltas: list[dict] = []
    with rpc(broker.port, session_expiry=300, client_id="outage-client") as c:
        done, messages = c.send("edgellm/v1/dev2/rpc/generate", {**LONG, "max_tokens": 60, "id": "outage"},
                                on_delta=lambda m: (deltas.append(m), first.set()))
        assert first.wait(30)
        broker.stop()  # a clean stop: the client's session and its subscription persist
        wait_until(lambda: "generate id=outage " in d.log.read_text(), 60, "the request never finished")
        assert not done.is_set()
        broker.start()
        assert done.wait(60), "the reply made during the outage never arrived"
        wait_until(lambda: all(row[1] is not None for row in journal(d)), 30, f"journal: {journal(d)}")
        assert d.stop() == 0
        d2 = daemon_factory(broker.port, device="dev2").start()
        assert c.call("edgellm/v1/dev2/rpc/status", {})["ok"]  # replies are ordered: a replay would come first
        assert d2.stop() == 0
    assert len(messages) == 1 and messages[0]["ok"] and messages[0]["usage"]["completion_tokens"] == 60
    assert "replaying" not in d2.log.read_text()
    assert not any(m.get("replayed") for m in deltas)


@pytest.mark.slow
def test_a_request_in_flight_at_two_crashes_is_set_aside_not_run_a_third_time(broker, daemon_factory):
    topic = "edgellm/v1/dev2/rpc/"
    firsts: list[threading.Event] = [threading.Event(), threading.Event()]
    deltas: list[dict] = []

    def on_delta(m: dict) -> None:
        deltas.append(m)
        starts = sum(1 for x in deltas if x["seq"] == 0)
        firsts[min(starts, 2) - 1].set()

    with rpc(broker.port, session_expiry=300, client_id="poison-client") as c:
        d = daemon_factory(broker.port, device="dev2").start()
        done, messages = c.send(topic + "generate", {**LONG, "id": "poison"}, on_delta=on_delta)
        assert firsts[0].wait(30)
        d.proc.kill()  # SIGKILL while it runs: as if this request had crashed the daemon
        d.proc.wait(10)
        d = daemon_factory(broker.port, device="dev2").start()
        assert firsts[1].wait(60), "the request was not run again after the first crash"
        d.proc.kill()
        d.proc.wait(10)
        d = daemon_factory(broker.port, device="dev2").start()
        assert done.wait(30), "the client was never told its request was set aside"
        status = c.call(topic + "status", {})
        assert d.stop() == 0
    starts = [m for m in deltas if m["seq"] == 0]
    assert len(starts) == 2 and "replayed" not in starts[0] and starts[1]["replayed"] is True
    assert messages[0]["error"]["code"] == "internal" and "set aside" in messages[0]["error"]["message"]
    assert status["dead_letters"] == 1 and "generate" not in status["requests"]
    (row, done_at, dead_at, reason, attempts), = journal(d)
    assert done_at is None and dead_at is not None and attempts == 2 and "2 stops in a row" in reason
    assert "set aside as a dead letter" in d.log.read_text()


@pytest.mark.slow
def test_a_long_prompt_holds_up_neither_refusals_nor_status_nor_short_requests(broker, daemon):
    """A 4,000-token prompt takes many seconds to prefill here. A refusal, a status and a short request sent
    meanwhile are answered long before it: checks run before the queue, and prompts run in chunks."""
    long_prompt = " ".join(f"Clause {i}: the supplier delivers on time." for i in range(450))
    with rpc(broker.port) as c:
        long_done, long_reply = c.send(TOPIC + "generate", {"prompt": long_prompt, "max_tokens": 1, "id": "long"})
        time.sleep(0.5)
        started = time.monotonic()
        bad = c.call(TOPIC + "generate", {"prompt": "hi", "max_tokens": 10**6}, timeout=20)
        refused_s = time.monotonic() - started
        status = c.call(TOPIC + "status", {}, timeout=20)
        status_s = time.monotonic() - started - refused_s
        short = c.call(TOPIC + "generate", {"prompt": "Say hi.", "max_tokens": 2}, timeout=60)
        assert not long_done.is_set(), "the long prompt was too short to show anything"
        assert long_done.wait(120)
    assert bad["error"]["code"] == "bad_request" and bad["error"]["param"] == "max_tokens" and refused_s < 2
    assert status["ok"] and status["queue_depth"] >= 1 and status_s < 1
    assert short["ok"] and long_reply[0]["ok"] and long_reply[0]["usage"]["prompt_tokens"] > 4000


def test_a_tool_whose_parameters_only_refer_to_themselves_is_a_bad_request(broker, daemon):
    """It answered `internal` ("parser error: Too many items") after the model nested calls in calls."""
    with rpc(broker.port) as c:
        r = c.call(TOPIC + "chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "loop", "parameters": {"$ref": "#"}}}]}, timeout=30)
        recursive = {"type": "object", "properties": {"child": {"$ref": "#"}, "n": {"type": "integer"}},
                     "required": ["n"]}
        ok = c.call(TOPIC + "chat", {"messages": [{"role": "user", "content": "Make a node with n = 3."}],
                                     "max_tokens": 40, "temperature": 0, "tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "node", "parameters": recursive}}]}, timeout=60)
    assert r["error"]["code"] == "bad_request" and r["error"]["param"] == "tools", r
    assert "only refers to itself" in r["error"]["message"]
    # a $ref to "#" inside the parameters means the parameters, not the answer's wrapper around them
    assert ok["ok"] or ok["error"]["code"] == "bad_request", ok
    if ok["ok"]:
        assert ok["tool_calls"][0]["name"] == "node" and "tool_call" not in json.dumps(ok["tool_calls"][0])
