"""The daemon over a real mosquitto: every method, streaming, 3.1.1 fallback, load, deadlines, cancel, fuzzing."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import Broker, DaemonProcess, rpc

TOPIC = "edgellm/v1/dev1/rpc/"
CAPITAL = "What is the capital city of France? Answer in one word."  # SmolLM2 answers it with Paris
LONG = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 200, "temperature": 0}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(broker, smollm2_int4, minilm_int8, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), broker.port, smollm2_int4,
                      env={"EDGELLM_EMBEDDING__PATH": str(minilm_int8), "EDGELLM_LIMITS__QUEUE_SIZE": "4"}).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def client(broker, daemon):
    with rpc(broker.port) as c:
        yield c


def test_generate_round_trip(client):
    r = client.call(TOPIC + "generate", {"prompt": CAPITAL, "max_tokens": 30, "temperature": 0, "id": "q1"})
    assert r["ok"] and r["id"] == "q1" and "Paris" in r["text"]
    assert r["finish_reason"] in ("stop", "length")
    assert r["usage"]["prompt_tokens"] > 0 and r["usage"]["completion_tokens"] > 0
    assert r["timings"]["ttft_ms"] > 0 and r["model"]["name"] == "SmolLM2-135M-Instruct-int4"


def test_chat_and_json_schema(client):
    r = client.call(TOPIC + "chat", {"messages": [{"role": "user", "content": "Total due: 42.50 EUR. As JSON."}],
                                     "temperature": 0, "json_schema": {
                                         "type": "object", "properties": {"total": {"type": "number"}},
                                         "required": ["total"], "additionalProperties": False}})
    assert r["ok"], r
    assert isinstance(r["json"]["total"], (int, float)) and "text" not in r


def test_embed_status_and_cancel_of_nothing(client):
    r = client.call(TOPIC + "embed", {"input": ["an invoice", "a contract"]})
    assert r["ok"] and r["dimension"] == 384 and len(r["embeddings"]) == 2
    s = client.call(TOPIC + "status", {})
    assert s["ok"] and s["state"] == "online" and s["device"] == "dev1"
    assert s["model"]["name"] == "SmolLM2-135M-Instruct-int4" and s["embedding_model"]["name"]
    c = client.call(TOPIC + "cancel", {"request_id": "never-sent"})
    assert c["ok"] and c["cancelled"] is False


def test_unknown_method_and_bad_payloads(client):
    assert client.call(TOPIC + "summon", {})["error"]["code"] == "unknown_method"
    cases = {b"{not json": "not JSON", b"\xff\xfe": "UTF-8", b"[1, 2]": "JSON object",
             b'{"prompt": "hi", "temprature": 1}': "temprature: unknown field",
             b'{"prompt": "hi", "top_p": 2}': "top_p", b'{"prompt": ""}': "prompt: is empty"}
    for payload, words in cases.items():
        r = client.call(TOPIC + "generate", payload)
        assert not r["ok"] and r["error"]["code"] == "bad_request" and words in r["error"]["message"], r
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    r = client.call(TOPIC + "generate", big)
    assert r["error"]["code"] == "too_large"
    r = client.call(TOPIC + "generate", {"prompt": "word " * 9000, "max_tokens": 5})
    assert r["error"]["code"] == "bad_request" and "context" in r["error"]["message"]


def test_streaming_deltas_then_one_result(client):
    deltas = []
    r = client.call(TOPIC + "generate", {"prompt": "List three fruits.", "max_tokens": 40, "temperature": 0,
                                         "stream": True}, on_delta=deltas.append)
    assert r["ok"] and r["type"] == "result"
    assert [d["seq"] for d in deltas] == list(range(len(deltas))) and len(deltas) > 3
    assert "".join(d["text"] for d in deltas) == r["text"]


def test_mqtt_311_clients_use_reply_to_in_the_payload(broker, daemon):
    got = threading.Event()
    replies = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="legacy", protocol=mqtt.MQTTv311)
    c.on_message = lambda _c, _u, m: (replies.append(json.loads(m.payload)), got.set())
    c.connect("127.0.0.1", broker.port)
    c.subscribe("legacy/replies", qos=1)
    c.loop_start()
    time.sleep(0.2)
    c.publish(TOPIC + "status", json.dumps({"reply_to": "legacy/replies", "id": "abc"}), qos=1)
    assert got.wait(10)
    c.loop_stop()
    c.disconnect()
    assert replies[0]["ok"] and replies[0]["id"] == "abc"


def test_mosquitto_rr_round_trip(broker, daemon):
    out = subprocess.run(["mosquitto_rr", "-p", str(broker.port), "-h", "127.0.0.1", "-t", TOPIC + "generate",
                          "-e", "rr/replies", "-m", json.dumps({"prompt": "Say hello.", "max_tokens": 8}),
                          "-W", "30"], capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"]


def test_requests_without_a_reply_address_are_counted(broker, daemon, client):
    before = client.call(TOPIC + "status", {})["unanswerable"]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(TOPIC + "generate", b'{"prompt": "nobody listens"}', qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    time.sleep(0.3)
    assert client.call(TOPIC + "status", {})["unanswerable"] == before + 1


def test_concurrent_requests_all_answered(client):
    pending = [client.send(TOPIC + "generate", {"prompt": f"Give me a number: {i}", "max_tokens": 6,
                                                 "temperature": 0, "id": f"c{i}"}) for i in range(4)]
    for i, (done, messages) in enumerate(pending):
        assert done.wait(60)
        assert messages[0]["ok"] and messages[0]["id"] == f"c{i}"


def test_a_full_queue_answers_busy_immediately(client):
    # 4 run at once (model.batch_size), 4 wait (limits.queue_size): of 12, some must be turned away.
    sent = [client.send(TOPIC + "generate", {**LONG, "max_tokens": 60, "id": f"b{i}"}) for i in range(12)]
    for done, _ in sent:
        assert done.wait(120)
    codes = [m[0]["ok"] or m[0]["error"]["code"] for _, m in sent]
    assert codes.count(True) >= 4 and "busy" in codes, codes
    assert all(len(m) == 1 for _, m in sent)


def test_deadlines_expire_requests_instead_of_running_them(client):
    # A raw counting prompt rarely meets end-of-sequence: 300 tokens keep the worker busy for seconds.
    # Four of them fill every batch slot (model.batch_size), so the late requests wait in the queue.
    blockers = [client.send(TOPIC + "generate", {"prompt": "1, 2, 3, 4, 5, 6, 7,", "raw": True, "max_tokens": 300,
                                                 "temperature": 0, "id": f"slow{i}"}) for i in range(4)]
    r2_done, r2 = client.send(TOPIC + "generate", {"prompt": "late too", "id": "late2"}, expiry_s=1)
    time.sleep(0.3)
    r = client.call(TOPIC + "generate", {"prompt": "late", "deadline_ms": 100, "id": "late"})
    assert r["error"]["code"] == "deadline_exceeded" and r["id"] == "late"
    for long_done, long_msgs in blockers:
        assert long_done.wait(60) and long_msgs[0]["ok"]
        assert long_msgs[0]["usage"]["completion_tokens"] > 100, long_msgs[0]  # it did outlast both deadlines
    assert r2_done.wait(30)  # Message Expiry Interval: expired in our queue, or dropped by the broker unanswered
    assert r2[0]["error"]["code"] == "deadline_exceeded"


def test_cancel_stops_a_running_request(client):
    first = threading.Event()
    done, messages = client.send(TOPIC + "generate", {**LONG, "stream": True, "id": "to-cancel"},
                                 on_delta=lambda d: first.set())
    assert first.wait(30)
    c = client.call(TOPIC + "cancel", {"request_id": "to-cancel"})
    assert c["ok"] and c["cancelled"] is True
    assert done.wait(30)
    assert messages[0]["error"]["code"] == "cancelled" and messages[0]["id"] == "to-cancel"


methods = st.sampled_from(["generate", "chat", "embed", "status", "cancel", "nope", ""])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
request_like = st.fixed_dictionaries({}, optional={
    "prompt": json_values | st.text(max_size=40), "messages": json_values, "max_tokens": json_values,
    "temperature": json_values, "stop": json_values, "json_schema": json_values, "input": json_values,
    "stream": json_values, "deadline_ms": json_values, "request_id": json_values, "id": json_values,
    "reply_to": json_values})
payloads = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     request_like.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def fuzz_client(broker, smollm2_int4, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz"), broker.port, smollm2_int4, device="fuzz",
                      env={"EDGELLM_LIMITS__MAX_TOKENS": "2", "EDGELLM_LIMITS__QUEUE_SIZE": "1000"}).start()
    with rpc(broker.port) as c:
        yield c
    assert d.stop() == 0


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=methods, payload=payloads)
def test_fuzzed_payloads_each_get_exactly_one_reply(fuzz_client, method, payload):
    done, messages = fuzz_client.send(f"edgellm/v1/fuzz/rpc/{method}", payload)
    assert done.wait(30), (method, payload)
    time.sleep(0.001)
    assert len(messages) == 1 and isinstance(messages[0]["ok"], bool)
    if not messages[0]["ok"]:
        assert messages[0]["error"]["code"] in ("bad_request", "unknown_method", "model_unavailable", "cancelled")


def test_the_fuzzed_daemon_still_serves(fuzz_client):
    r = fuzz_client.call("edgellm/v1/fuzz/rpc/status", {})
    assert r["ok"] and r["requests_total"] + r["errors_total"] >= 100


def test_edgellm_request_cli_streams_and_prints_the_result(broker, daemon):
    import sys

    from tests.harness import ROOT

    r = subprocess.run([sys.executable, "-m", "daemon.cli", "request", "generate", "--stream", "--device", "dev1",
                        json.dumps({"prompt": CAPITAL, "max_tokens": 20, "temperature": 0}),
                        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--timeout", "60"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    *text, last = r.stdout.strip().splitlines()
    assert "Paris" in "\n".join(text) and json.loads(last)["ok"]
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "request", "generate", "{}", "--device", "dev1",
                        "--mqtt-port", str(broker.port), "--mqtt-host", "127.0.0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "bad_request"


def test_telemetry_is_published_periodically(broker, daemon, client):
    client.call(TOPIC + "status", {})
    got = threading.Event()
    seen: list[dict] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *_: cl.subscribe("edgellm/v1/dev1/telemetry", qos=0)
    c.on_message = lambda _c, _u, m: (seen.append(json.loads(m.payload)), got.set())
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert got.wait(10)  # EDGELLM_TELEMETRY_INTERVAL=1 in the harness
    c.loop_stop()
    c.disconnect()
    t = seen[0]
    assert t["device"] == "dev1" and t["queue_depth"] >= 0 and t["rss_mb"] > 50
    assert t["requests"]["status"] >= 1 and "errors_total" in t and "decode_tps" in t
