"""The daemon over a real mosquitto: every method, streaming, 3.1.1 fallback, load, deadlines, cancel, fuzzing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import EDGELLM, Broker, DaemonProcess, examples, rpc, wait_until

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


def test_a_request_chooses_speculative_decoding_and_usage_counts_the_drafts(client):
    copy = "Repeat exactly: Acme Tools GmbH, Hauptstrasse 12, 10115 Berlin, invoice INV-2024-0042."
    r = client.call(TOPIC + "generate", {"prompt": copy, "max_tokens": 40, "temperature": 0, "speculative": 4})
    assert r["ok"] and r["usage"]["accepted_tokens"] > 0, r["usage"]
    assert r["usage"]["drafted_tokens"] >= r["usage"]["accepted_tokens"]
    off = client.call(TOPIC + "generate", {"prompt": copy, "max_tokens": 40, "temperature": 0, "speculative": "off"})
    assert off["ok"] and off["usage"]["drafted_tokens"] == 0
    bad = client.call(TOPIC + "generate", {"prompt": copy, "speculative": 99})
    assert bad["error"]["code"] == "bad_request" and bad["error"]["param"] == "speculative", bad
    assert "draft length from 1 to 16" in bad["error"]["message"]


def test_each_request_is_one_log_line(client, daemon):
    r = client.call(TOPIC + "generate", {"prompt": CAPITAL, "max_tokens": 5, "temperature": 0, "id": "logged"})
    bad = client.call(TOPIC + "generate", {"prompt": 7, "id": "badly"})
    assert r["ok"] and bad["error"]["code"] == "bad_request"
    lines = daemon.log.read_text().splitlines()
    done = [line for line in lines if "generate id=logged " in line]
    tokens = f"tokens={r['usage']['prompt_tokens']}+{r['usage']['completion_tokens']}"
    assert len(done) == 1 and " INFO edgellm.worker: " in done[0] and tokens in done[0] and " ok " in done[0]
    assert [line for line in lines if "generate id=badly error=bad_request" in line]


def test_chat_and_json_schema(client):
    r = client.call(TOPIC + "chat", {"messages": [{"role": "user", "content": "Total due: 42.50 EUR. As JSON."}],
                                     "temperature": 0, "json_schema": {
                                         "type": "object", "properties": {"total": {"type": "number"}},
                                         "required": ["total"], "additionalProperties": False}})
    assert r["ok"], r
    assert isinstance(r["json"]["total"], (int, float)) and "text" not in r


def test_a_copied_field_comes_from_the_prompt_over_mqtt(client):
    text = "Rechnung Nr. 2024-ZK-17 von Zeller Kältetechnik GmbH, Summe 99,00 EUR."
    r = client.call(TOPIC + "generate", {"prompt": f"{text}\nVendor as JSON.", "temperature": 0, "json_schema": {
        "type": "object", "required": ["vendor"], "additionalProperties": False,
        "properties": {"vendor": {"type": "string", "x-edgellm-copy": True}}}})
    assert r["ok"], r
    assert r["json"]["vendor"] and r["json"]["vendor"] in text
    r = client.call(TOPIC + "generate", {"prompt": text, "json_schema": {
        "type": "object", "properties": {"vendor": {"type": "string", "x-edgellm-copy": 1}}}})
    assert r["error"]["code"] == "bad_request" and "x-edgellm-copy must be true or false" in r["error"]["message"]


VALVE_TOOL = {"type": "function", "function": {"name": "close_valve", "description": "Close a water valve",
                                             "parameters": {"type": "object", "required": ["valve"],
                                                            "properties": {"valve": {"type": "integer"}}}}}


def test_chat_with_tools_answers_a_call_over_mqtt(client):
    """An IoT gateway's request: "close valve 3" becomes a call it can execute, with typed arguments."""
    r = client.call(TOPIC + "chat", {"messages": [{"role": "user", "content": "Close valve 3"}], "temperature": 0,
                                     "tools": [VALVE_TOOL], "tool_choice": "required", "stream": True})
    assert r["ok"], r
    [call] = r["tool_calls"]
    assert call["name"] == "close_valve" and call["arguments"] == {"valve": 3} and call["id"].startswith("call_")
    assert r["finish_reason"] == "tool_calls" and r["text"] == ""
    history = [{"role": "user", "content": "Close valve 3"}, {"role": "assistant", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "name": "close_valve", "content": "valve 3 closed"}]
    r = client.call(TOPIC + "chat", {"messages": history, "temperature": 0, "max_tokens": 20,
                                     "tools": [VALVE_TOOL], "tool_choice": "none"})
    assert r["ok"] and r["text"].strip() and "tool_calls" not in r, r
    r = client.call(TOPIC + "chat", {"messages": history[:1], "tools": [VALVE_TOOL],
                                     "tool_choice": {"type": "function", "function": {"name": "open_valve"}}})
    assert r["error"]["code"] == "bad_request" and "'open_valve' is not one of the tools" in r["error"]["message"]


def test_embed_status_and_cancel_of_nothing(client):
    r = client.call(TOPIC + "embed", {"input": ["an invoice", "a contract"]})
    assert r["ok"] and r["dimension"] == 384 and len(r["embeddings"]) == 2
    s = client.call(TOPIC + "status", {})
    assert s["ok"] and s["state"] == "online" and s["device"] == "dev1"
    assert s["model"]["name"] == "SmolLM2-135M-Instruct-int4" and s["embedding_model"]["name"]
    assert s["sequences"] == {"queued": 0}  # the scheduler holds nothing between requests
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
    subscribed = threading.Event()
    c.on_message = lambda _c, _u, m: (replies.append(json.loads(m.payload)), got.set())
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", broker.port)
    c.subscribe("legacy/replies", qos=1)
    c.loop_start()
    assert subscribed.wait(10)
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
    wait_until(lambda: client.call(TOPIC + "status", {})["unanswerable"] > before, 10, "the count")
    assert client.call(TOPIC + "status", {})["unanswerable"] == before + 1


def test_concurrent_requests_all_answered(client):
    pending = [client.send(TOPIC + "generate", {"prompt": f"Give me a number: {i}", "max_tokens": 6,
                                                 "temperature": 0, "id": f"c{i}"}) for i in range(4)]
    for i, (done, messages) in enumerate(pending):
        assert done.wait(60)
        assert messages[0]["ok"] and messages[0]["id"] == f"c{i}"


@pytest.mark.slow
def test_a_full_queue_answers_busy_immediately(client):
    # 4 run at once (model.batch_size), 4 wait (limits.queue_size): of 12, some must be turned away.
    sent = [client.send(TOPIC + "generate", {**LONG, "max_tokens": 60, "id": f"b{i}"}) for i in range(12)]
    for done, _ in sent:
        assert done.wait(120)
    codes = [m[0]["ok"] or m[0]["error"]["code"] for _, m in sent]
    assert codes.count(True) >= 4 and "busy" in codes, codes
    assert all(len(m) == 1 for _, m in sent)


@pytest.mark.slow
def test_deadlines_expire_requests_instead_of_running_them(client):
    # A raw counting prompt rarely meets end-of-sequence: 300 tokens keep the worker busy for seconds. Four of
    # them fill every batch slot (model.batch_size); once each has streamed a token they are running, not
    # queued, so the late requests wait in an empty queue (never `busy`) until their deadlines pass.
    started = [threading.Event() for _ in range(4)]
    blockers = [client.send(TOPIC + "generate", {"prompt": "1, 2, 3, 4, 5, 6, 7,", "raw": True, "max_tokens": 300,
                                                 "temperature": 0, "ignore_eos": True, "stream": True,
                                                 "id": f"slow{i}"}, on_delta=lambda _d, e=started[i]: e.set())
                for i in range(4)]
    for event in started:
        assert event.wait(60)
    r2_done, r2 = client.send(TOPIC + "generate", {"prompt": "late too", "id": "late2"}, expiry_s=1)
    r = client.call(TOPIC + "generate", {"prompt": "late", "deadline_ms": 100, "id": "late"})
    assert r["error"]["code"] == "deadline_exceeded" and r["id"] == "late"
    for long_done, long_msgs in blockers:
        assert long_done.wait(60) and long_msgs[0]["ok"]
        assert long_msgs[0]["usage"]["completion_tokens"] == 300, long_msgs[0]  # it did outlast both deadlines
    assert r2_done.wait(30)  # Message Expiry Interval: expired in our queue
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


def test_deeply_nested_payloads_are_bad_requests_on_every_method(client):
    deep_list = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    for method in ("generate", "chat", "embed", "status", "cancel", "ask", "search", "ingest", "delete"):
        for payload in (deep_list, deep_object):
            r = client.call(TOPIC + method, payload, timeout=30)
            assert r["error"]["code"] == "bad_request" and "nested too deeply" in r["error"]["message"], r
    schema = '{"type": "array", "items": ' * 2000 + '{"type": "string"}' + "}" * 2000  # a valid schema, 2000 deep
    r = client.call(TOPIC + "generate", ('{"prompt": "hi", "json_schema": ' + schema + "}").encode(), timeout=30)
    assert r["error"]["code"] == "bad_request" and "nested too deeply" in r["error"]["message"], r


def test_lone_surrogates_are_answered(client):
    """JSON may escape a lone surrogate; such a string cannot be encoded as UTF-8, yet the reply must go out."""
    r = client.call(TOPIC + "status", b'{"id": "\\ud800"}', timeout=30)
    assert r["ok"] is False and r["error"]["code"] == "bad_request" and r["id"] == "\ufffd"
    r = client.call(TOPIC + "generate", b'{"prompt": "hi \\udfff there", "id": "s2"}', timeout=30)
    assert r["error"]["code"] == "bad_request" and "prompt" in r["error"]["message"] and r["id"] == "s2"


def test_a_schema_that_cannot_be_enforced_is_a_bad_request(client):
    r = client.call(TOPIC + "generate", {"prompt": "hi", "json_schema": {"$ref": "#"}}, timeout=30)
    assert r["error"]["code"] == "bad_request" and r["error"]["message"].startswith("json_schema: cannot be "), r
    assert "<state>" not in r["error"]["message"] and len(r["error"]["message"]) < 300


def test_wrong_types_are_refused_not_coerced(client):
    for value in ("10", True, 10.5):
        r = client.call(TOPIC + "generate", {"prompt": "hi", "max_tokens": value}, timeout=30)
        assert r["error"]["code"] == "bad_request" and r["error"]["message"].startswith("max_tokens"), (value, r)
        assert r["error"]["param"] == "max_tokens"
    r = client.call(TOPIC + "generate", {"prompt": "hi", "temperature": 0, "max_tokens": 2}, timeout=30)
    assert r["ok"], r  # an integer is still a valid number


# -- fuzzing: at least 10,000 generated payloads a run -------------------------------------------------
METHODS = ["generate", "chat", "embed", "status", "cancel", "ingest", "search", "ask", "delete"]
SURROGATE = st.sampled_from(["\\ud800", "\\udfff", "\\udbff\\ud800x", "\\ud83d"])  # JSON escapes, unpaired
HUGE = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "1" * 400, "-" + "9" * 500, "1e-400", "0.1e309"])


def raw(value) -> str:
    return json.dumps(value)


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
# A field's raw JSON text: ordinary values, wrong types, huge numbers, lone surrogates, deep nesting.
field_text = st.one_of(json_values.map(raw), HUGE, SURROGATE.map(lambda s: f'"a{s}b"'),
                       st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
                       st.integers(1, 3000).map(lambda n: '{"a":' * n + "0" + "}" * n))
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "json_schema",
          "input", "stream", "deadline_ms", "request_id", "id", "reply_to", "raw", "ignore_eos", "question", "query",
          "k", "text", "source", "path", "collection", "metadata", "filter", "mode"]
VALID = {  # one well-formed request per method, which the fuzzer then bends
    "generate": {"prompt": "Say hi.", "max_tokens": 2}, "chat": {"messages": [{"role": "user", "content": "hi"}]},
    "embed": {"input": "an invoice"}, "status": {}, "cancel": {"request_id": "x"},
    "ingest": {"text": "Pumps carry a 24 month warranty.", "source": "fuzz.txt"}, "search": {"query": "warranty"},
    "ask": {"question": "How long is the warranty?", "max_tokens": 2}, "delete": {"source": "fuzz.txt"}}


@st.composite
def bent_requests(draw) -> tuple[str, bytes]:
    """A method and its valid request, with up to three fields replaced or added as raw JSON text."""
    method = draw(st.sampled_from(METHODS))
    fields = {k: raw(v) for k, v in VALID[method].items()}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        fields[name] = draw(field_text)
    return method, ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()


@st.composite
def valid_requests(draw) -> tuple[str, bytes]:
    """A method and a request it must serve: the success paths get fuzzed too."""
    method = draw(st.sampled_from(METHODS))
    body = dict(VALID[method])
    body["id"] = draw(st.text(min_size=1, max_size=40))
    if method in ("generate", "chat", "ask"):
        body.update(temperature=draw(st.floats(0, 2)), max_tokens=draw(st.integers(1, 2)),
                    stream=draw(st.booleans()), seed=draw(st.none() | st.integers(0, 2**63 - 1)))
    return method, json.dumps(body).encode()


anything = st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     field_text.map(str.encode), bent_requests().map(lambda pair: pair[1]))
cases = st.one_of(valid_requests(), bent_requests(), st.tuples(st.sampled_from([*METHODS, "nope", ""]), anything))
# What each method may answer besides ok: never `internal`, never a code that does not fit the method.
ALLOWED = {m: {"bad_request"} for m in METHODS}
for m in ("generate", "chat", "embed", "ingest", "search", "ask", "delete"):  # the worker's: they can expire
    ALLOWED[m] |= {"deadline_exceeded"}
for m in ("embed", "ingest", "search", "ask", "delete"):
    ALLOWED[m] |= {"model_unavailable"}


@pytest.fixture
def fuzzed_daemon(broker, smollm2_int4, minilm_int8, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    d = DaemonProcess(folder, broker.port, smollm2_int4, device="fuzz", env={
        "EDGELLM_LIMITS__MAX_TOKENS": "2", "EDGELLM_LIMITS__QUEUE_SIZE": "1000",
        "EDGELLM_EMBEDDING__PATH": str(minilm_int8), "EDGELLM_STORE__PATH": str(folder / "store.db")}).start()
    with rpc(broker.port) as c:
        yield c
    assert d.stop() == 0


FUZZ_PAYLOADS = examples(10_000)  # 200 in the quick run (tests/conftest.py)


def test_fuzzed_payloads_each_get_exactly_one_reply(fuzzed_daemon):
    """Every generated payload gets exactly one reply, with a code that fits its method, and never `internal`."""
    client = fuzzed_daemon
    sent: list[tuple[str, bytes, list[dict]]] = []

    @settings(max_examples=FUZZ_PAYLOADS, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=cases)
    def one(case):
        method, payload = case
        done, messages = client.send(f"edgellm/v1/fuzz/rpc/{method}", payload)
        assert done.wait(30), (method, payload[:200])
        sent.append((method, payload, messages))
        reply = messages[0]
        assert isinstance(reply["ok"], bool)
        if not reply["ok"]:
            allowed = ALLOWED.get(method, {"unknown_method", "bad_request"})
            assert reply["error"]["code"] in allowed, (method, payload[:200], reply)

    one()
    assert len(sent) >= FUZZ_PAYLOADS * 0.99  # hypothesis may stop a few short when it runs out of new cases
    # Replies leave the daemon in order on one connection: once a status reply shows an idle daemon, any
    # second reply to an earlier request would already have arrived.
    status, polls = client.call("edgellm/v1/fuzz/rpc/status", {}), 1
    while status["queue_depth"]:
        time.sleep(0.1)
        status, polls = client.call("edgellm/v1/fuzz/rpc/status", {}), polls + 1
    counts = [len(messages) for _, _, messages in sent]
    assert counts.count(1) == len(counts), [m for m, _, msgs in sent if len(msgs) != 1][:5]
    codes = Counter(msgs[0]["error"]["code"] if not msgs[0]["ok"] else "ok" for _, _, msgs in sent)
    # the strategies make about a tenth valid requests and a third invalid ones: both paths are exercised
    assert "internal" not in codes and codes["ok"] > len(sent) / 20 and codes["bad_request"] > len(sent) / 10, codes
    answered = status["requests_total"] + status["errors_total"] - polls  # less the status calls above
    assert status["errors"].get("internal", 0) == 0 and answered >= len(sent), (answered, len(sent))
    print(f"fuzz: {len(counts)} payloads, {dict(codes)}")  # quoted in docs/reliability.md


@pytest.mark.slow
def test_edgellm_request_cli_streams_and_prints_the_result(broker, daemon):

    from tests.harness import ROOT

    r = subprocess.run([*EDGELLM, "request", "generate", "--stream", "--device", "dev1",
                        json.dumps({"prompt": CAPITAL, "max_tokens": 20, "temperature": 0}),
                        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--timeout", "60"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.count("Paris") == 1  # the text once, as it streamed
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["ok"] and "text" not in summary and summary["usage"]["completion_tokens"] > 0
    r = subprocess.run([*EDGELLM, "request", "generate", "{}", "--device", "dev1",
                        "--mqtt-port", str(broker.port), "--mqtt-host", "127.0.0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "bad_request"


def test_telemetry_is_published_periodically(broker, daemon, client):
    # a request of each kind first, so the counts below hold whichever tests ran before (or none)
    assert client.call(TOPIC + "generate", {"prompt": CAPITAL, "max_tokens": 3, "temperature": 0})["ok"]
    assert client.call(TOPIC + "generate", {"prompt": 7})["error"]["code"] == "bad_request"
    before = client.call(TOPIC + "status", {})
    got = threading.Event()
    seen: list[dict] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *_: cl.subscribe("edgellm/v1/dev1/telemetry", qos=0)
    # the retained one (published at some earlier moment) is not what this test waits for: a fresh one
    c.on_message = lambda _c, _u, m: None if m.retain else (seen.append(json.loads(m.payload)), got.set())
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert got.wait(10)  # EDGELLM_TELEMETRY_INTERVAL=1 in the harness
    c.loop_stop()
    c.disconnect()
    t = seen[0]
    assert t["device"] == "dev1" and t["queue_depth"] == 0 and 50 < t["rss_mb"] < 2000  # idle between tests
    # nothing ran between the status call (which counted itself) and this telemetry: the same counts
    assert (t["requests"], t["errors"]) == (before["requests"], before["errors"])
    assert t["requests"]["generate"] >= 2 and t["errors"]["bad_request"] >= 1 and t["decode_tps"] > 10
    assert t["errors_total"] == sum(t["errors"].values())
