"""The OpenAI-compatible API of the running daemon, driven by the official openai SDK and LangChain."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import time

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess, free_port, wait_for_port, wait_until

KEY = "sk-edge-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_int4, minilm_int8):
    """The daemon (for its log) and its API's address."""
    folder = tmp_path_factory.mktemp("http")
    broker = Broker(folder).start()
    port = free_port()
    d = DaemonProcess(folder, broker.port, smollm2_int4, device="http1", env={
        "EDGELLM_HTTP__ENABLED": "true", "EDGELLM_HTTP__PORT": str(port), "EDGELLM_HTTP__HOST": "0.0.0.0",
        "EDGELLM_HTTP__API_KEY": KEY, "EDGELLM_EMBEDDING__PATH": str(minilm_int8),
        "EDGELLM_LIMITS__QUEUE_SIZE": "8", "EDGELLM_LIMITS__STREAM_STALL_SECONDS": "3",
        "EDGELLM_HTTP__SEND_BUFFER_KB": "16"}).start()
    wait_for_port(port)
    yield d, f"http://127.0.0.1:{port}"
    assert d.stop() == 0
    broker.stop()


@pytest.fixture(scope="module")
def api(served) -> str:
    return served[1]


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0)


def test_models_and_chat_completion(client):
    models = client.models.list()
    name = models.data[0].id
    assert name == "SmolLM2-135M-Instruct-int4"
    for model in (name, "default"):
        question = {"role": "user", "content": "What is the capital city of France? Answer in one word."}
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=24, messages=[question])
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens > 0 and r.usage.total_tokens > r.usage.completion_tokens


def test_streaming_chat_joins_to_the_full_answer(client):
    kwargs = dict(model="default", temperature=0, max_tokens=30,
                  messages=[{"role": "user", "content": "Name three colours."}])
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    parts, usage = [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == full and len(parts) > 3 and usage.completion_tokens > 0


def test_json_schema_response_format_fails_closed(client):
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}},
              "required": ["total", "currency"], "additionalProperties": False}
    r = client.chat.completions.create(model="default", temperature=0, messages=[
        {"role": "user", "content": "Invoice total: 99.50 EUR. Give the fields as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert value["currency"] in ("EUR", "USD") and isinstance(value["total"], (int, float))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "objekt"}}})
    assert "json_schema" in str(err.value)


def test_a_copied_field_comes_from_the_prompt_over_http(client, api):
    text = "Invoice RX-88-QT from Brightwater Tiling Ltd, total 340.00 GBP."
    schema = {"type": "object", "required": ["vendor", "number"], "additionalProperties": False,
              "properties": {"vendor": {"type": "string", "x-edgellm-copy": True},
                             "number": {"type": "string", "x-edgellm-copy": True}}}
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=60, messages=[
        {"role": "user", "content": f"{text}\nGive vendor and invoice number as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert value["vendor"] in text and value["number"] in text
    schema["properties"]["number"] = {"type": "boolean", "x-edgellm-copy": True}
    r = httpx.post(f"{api}/v1/chat/completions", headers=auth(), json={
        "model": "default", "messages": [{"role": "user", "content": text}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "x-edgellm-copy" in r.json()["error"]["message"]


def test_completions_and_embeddings(client):
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text.strip() and r.usage.prompt_tokens > 0
    e = client.embeddings.create(model="default", input=["an invoice", "a contract"])  # the SDK asks for base64
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384
    assert abs(sum(x * x for x in e.data[0].embedding) - 1) < 1e-3
    with pytest.raises(openai.BadRequestError) as refused:  # what LangChain's OpenAIEmbeddings sends by default
        client.embeddings.create(model="default", input=[[15339, 1917]])
    error = refused.value.body
    assert error["param"] == "input" and "check_embedding_ctx_length=False" in error["message"], error


def test_speculative_decoding_is_reported_as_predicted_tokens(client, api):
    copy = "Repeat exactly: Acme Tools GmbH, Hauptstrasse 12, 10115 Berlin, invoice INV-2024-0042."
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=40, extra_body={"speculative": 4},
                                       messages=[{"role": "user", "content": copy}])
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0, r.usage
    assert details.rejected_prediction_tokens >= 0
    text = httpx.get(f"{api}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    drafted = next(line for line in text.splitlines() if line.startswith("edgellm_draft_tokens_total "))
    assert float(drafted.split()[1]) >= details.accepted_prediction_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="default", max_tokens=4, extra_body={"speculative": "always"},
                                       messages=[{"role": "user", "content": copy}])
    assert refused.value.body["param"] == "speculative", refused.value.body


def test_errors_have_openai_shape_and_status(client, api):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                       temperature=9)
    big = httpx.post(f"{api}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                     content=b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"


def test_no_key_on_a_non_loopback_bind_is_401(api):
    r = httpx.post(f"{api}/v1/chat/completions", json={"model": "default", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{api}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{api}/health").json()["status"] == "ok"


def test_a_non_loopback_bind_without_a_key_is_refused(smollm2_int4):
    r = subprocess.run([*EDGELLM, "serve", "--model", str(smollm2_int4)], cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "EDGELLM_HTTP__ENABLED": "true", "EDGELLM_HTTP__HOST": "0.0.0.0"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "http.api_key: required" in r.stderr


def test_metrics_in_prometheus_format(client, api):
    client.chat.completions.create(model="default", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(f"{api}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    for name in ("edgellm_requests_total{method=\"chat\"}", "edgellm_queue_depth", "edgellm_tokens_total",
                 "edgellm_time_to_first_token_ms_bucket", "edgellm_decode_tokens_per_second_count",
                 "edgellm_model_info{name=\"SmolLM2-135M-Instruct-int4\"",
                 'edgellm_update_info{state="none"} 1.0'):  # no update agent here; test_fleet sees it change
        assert name in text, name


@pytest.mark.slow
def test_fifty_concurrent_requests_are_each_answered_or_told_busy(api):
    def one(i: int) -> int:
        r = httpx.post(f"{api}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=300,
                       json={"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": f"#{i}"}]})
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "busy"
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
    assert codes.count(200) >= 8 and codes.count(429) >= 1


class Invoice(BaseModel):
    vendor: str = Field(max_length=40)
    total: float
    currency: str = Field(pattern="^(EUR|USD|GBP)$")


@pytest.mark.slow
def test_langchain_chat_openai_invoke_stream_and_structured_output(api):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{api}/v1", api_key=KEY, model="default", temperature=0, max_tokens=40,
                     max_retries=0)
    assert "Paris" in llm.invoke("What is the capital city of France? Answer in one word.").content
    assert "".join(c.content for c in llm.stream("Count to three.")).strip()
    structured = llm.with_structured_output(Invoice)
    invoice = structured.invoke("Invoice from ACME Ltd, total due 120.00 GBP. Extract vendor, total, currency.")
    assert isinstance(invoice, Invoice) and invoice.currency in ("EUR", "USD", "GBP")


TOOLS = [{"type": "function", "function": {
    "name": "close_valve", "description": "Close a water valve",
    "parameters": {"type": "object", "properties": {"valve": {"type": "integer"}}, "required": ["valve"]}}},
    {"type": "function", "function": {
        "name": "get_temperature", "description": "Read the temperature of a room",
        "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]}}}]


@pytest.mark.slow
def test_tool_calls_with_the_openai_sdk(client):
    """tools and tool_choice as OpenAI takes them; the call's arguments validate against its schema."""
    ask = [{"role": "user", "content": "Close valve 3"}]
    r = client.chat.completions.create(model="default", temperature=0, messages=ask, tools=TOOLS,
                                       tool_choice="required")
    choice = r.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.type == "function" and call.function.name == "close_valve"
    assert json.loads(call.function.arguments) == {"valve": 3}
    r = client.chat.completions.create(model="default", temperature=0, messages=ask, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_temperature"}})
    [forced] = r.choices[0].message.tool_calls
    assert forced.function.name == "get_temperature"
    assert set(json.loads(forced.function.arguments)) == {"room"}  # only the declared parameter, a string
    assert isinstance(json.loads(forced.function.arguments)["room"], str)
    # the call and its result go back into the history; with tool_choice none the model answers in text
    history = [*ask, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Valve 3 is closed."}]
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=20, messages=history,
                                       tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content.strip() and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_calls_stream_as_openai_streams_them(client):
    stream = client.chat.completions.create(model="default", temperature=0, stream=True, tools=TOOLS,
                                            tool_choice="required",
                                            messages=[{"role": "user", "content": "Close valve 3"}])
    ids, names, arguments, finish = [], [], "", None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            ids += [delta.id] if delta.id else []
            names += [delta.function.name] if delta.function.name else []
            arguments += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert len(ids) == 1 and names == ["close_valve"] and json.loads(arguments) == {"valve": 3}
    assert finish == "tool_calls"


def test_langchain_bind_tools(api):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def close_valve(valve: int) -> str:
        """Close a water valve."""
        return f"valve {valve} closed"

    llm = ChatOpenAI(base_url=f"{api}/v1", api_key=KEY, model="default", temperature=0, max_retries=0)
    message = llm.bind_tools([close_valve], tool_choice="close_valve").invoke("Close valve 3")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("close_valve", {"valve": 3})]
    assert close_valve.invoke(message.tool_calls[0]).content == "valve 3 closed"  # what the agent runs next


def test_bad_tools_get_openai_shaped_400s(api):
    chat = f"{api}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "tools": TOOLS,
                                               "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "tools": bad})
    assert r.status_code == 400 and "not a valid JSON Schema" in r.json()["error"]["message"], r.text
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "tools": [{"function": {}}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools"), r.text
    broken = [*hi, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "close_valve", "arguments": "{valve"}}]}]
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": broken})
    assert r.status_code == 400 and "messages.1.tool_calls.0.function.arguments" in r.json()["error"]["message"]


def auth() -> dict:
    return {"authorization": f"Bearer {KEY}"}


def test_bad_input_gets_openai_shaped_400s_naming_the_parameter(api):
    chat = f"{api}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "response_format": {"type": "xml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type"  # never free text
    r = httpx.post(chat, headers={**auth(), "content-type": "application/json"}, content=b'{"model": "\xff\xfe"}')
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(chat, headers=auth(), content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    for value in ("10", True):
        r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "max_tokens": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_only_a_bearer_key_is_accepted(api):
    assert httpx.get(f"{api}/v1/models", headers={"authorization": KEY}).status_code == 401
    assert httpx.get(f"{api}/v1/models", headers={"authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(f"{api}/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(api):
    """No Content-Length: the limit is enforced as the body arrives, so 50 MB never sit in memory."""
    def rss_mb() -> float:
        return metrics_value(api, "process_resident_memory_bytes") / 2**20

    before = rss_mb()
    sent = {"bytes": 0}

    def body():
        for _ in range(50):
            sent["bytes"] += 1 << 20
            yield b" " * (1 << 20)

    try:
        r = httpx.post(f"{api}/v1/chat/completions", headers=auth(), content=body(), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    except httpx.RemoteProtocolError:  # the server may close the connection before the upload ends
        pass
    assert rss_mb() - before < 20, (before, rss_mb())


def metrics_value(api: str, name: str, labels: str = "", default: float | None = None) -> float:
    for line in httpx.get(f"{api}/metrics", headers=auth()).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    assert default is not None, f"{name}{labels} not in /metrics"
    return default


def test_a_streaming_client_that_hangs_up_cancels_its_generation(api):
    cancelled = metrics_value(api, "edgellm_errors_total", '{code="cancelled"}', default=0.0)
    disconnects = metrics_value(api, "edgellm_client_disconnects_total")
    with httpx.stream("POST", f"{api}/v1/completions", headers=auth(), timeout=60, json={
            "model": "default", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "stream": True}) as r:
        chunks = r.iter_lines()
        next(chunks)
        next(chunks)  # two deltas: it is generating; now hang up
    deadline = time.monotonic() + 10
    while metrics_value(api, "edgellm_client_disconnects_total") == disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics_value(api, "edgellm_client_disconnects_total") == disconnects + 1
    assert metrics_value(api, "edgellm_errors_total", '{code="cancelled"}') == cancelled + 1
    assert httpx.get(f"{api}/health").json()["queue_depth"] == 0  # 1,500 tokens would take many seconds


@pytest.mark.slow
def test_a_stream_whose_client_stops_reading_is_cancelled_and_frees_its_slot(api):
    """A client that keeps its socket open and reads nothing: once its buffers are full (http.send_buffer_kb, 16
    here), the stream waits in a send, and after limits.stream_stall_seconds (3 s) it is cancelled like a
    hang-up."""
    stalled = metrics_value(api, "edgellm_stalled_streams_total")
    body = json.dumps({"model": "default", "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few hundred tokens
    sock.connect(("127.0.0.1", int(api.rsplit(":", 1)[1])))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60  # 2,000 tokens take about 30 s here: the stall comes well before
        while metrics_value(api, "edgellm_stalled_streams_total") == stalled:
            assert time.monotonic() < deadline, "the unread stream was never cancelled"
            time.sleep(0.2)
        while httpx.get(f"{api}/health").json()["queue_depth"]:
            assert time.monotonic() < deadline, "the cancelled stream still holds its slot"
            time.sleep(0.05)
        r = httpx.post(f"{api}/v1/completions", headers=auth(), timeout=30,
                       json={"model": "default", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        sock.close()
    assert metrics_value(api, "edgellm_stalled_streams_total") == stalled + 1


def test_a_client_hanging_up_mid_body_is_one_info_line(served):
    daemon, api = served
    sock = socket.create_connection(("127.0.0.1", int(api.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\": ")
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 10
    while "hung up before its request body was complete" not in daemon.log.read_text():
        assert time.monotonic() < deadline, daemon.log.read_text()[-2000:]
        time.sleep(0.05)
    log = daemon.log.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert [line for line in log.splitlines() if "hung up before its request body" in line][0].count(" INFO ") == 1


def test_health_shows_where_the_broker_is_only_with_the_key(api):
    anonymous = httpx.get(f"{api}/health").json()
    assert anonymous["status"] == "ok" and anonymous["mqtt"] == {"connected": True, "state": "connected"}
    keyed = httpx.get(f"{api}/health", headers=auth()).json()
    assert keyed["mqtt"]["connected"] is True and keyed["mqtt"]["broker"].startswith("127.0.0.1:")


def test_a_tool_whose_parameters_only_refer_to_themselves_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "loop", "parameters": {"$ref": "#"}}}])
    assert err.value.body["param"] == "tools" and "only refers to itself" in err.value.body["message"]


# -- strict where OpenAI is strict; what users rely on -----------------------------------------------------------
def test_an_unknown_field_is_a_400_naming_it_and_harmless_ones_pass(served, api):
    daemon, _ = served
    chat = f"{api}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    errors = metrics_value(api, "edgellm_errors_total", '{code="bad_request"}', default=0)
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "max_tokns": 3})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokns" and error["type"] == "invalid_request_error"
    assert "unknown field" in error["message"] and "did you mean 'max_tokens'" in error["message"]
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "x"), ("mirostat", 2), ("logit_bias", {"1": 5})):
        r = httpx.post(f"{api}/v1/completions", headers=auth(),
                       json={"model": "default", "prompt": "a", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert "not supported" in r.json()["error"]["message"]
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": image})
    assert r.status_code == 400 and "messages.0.content.1: 'image_url' parts are not supported" in r.text
    r = httpx.post(chat, headers=auth(), json={"model": "default", "messages": hi, "max_tokens": 2, "user": "u1",
                                               "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True})
    assert r.status_code == 200, r.text
    # each refusal is one log line and counts by code, as over MQTT
    assert metrics_value(api, "edgellm_errors_total", '{code="bad_request"}') == errors + 7
    wait_until(lambda: "HTTP POST /v1/chat/completions 400 bad_request: max_tokns: unknown field"
               in daemon.log.read_text(), what="the log line of the refusal")


def test_logprobs_and_top_logprobs_as_openai_returns_them(client):
    question = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="default", temperature=0, max_tokens=8, messages=question,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        ranked = [a.logprob for a in t.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == ranked[0]  # greedy took the likeliest
        assert bytes(t.bytes).decode() == t.token
    streamed = client.chat.completions.create(model="default", temperature=0, max_tokens=8, messages=question,
                                              logprobs=True, stream=True)
    tokens = [t for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in tokens)  # logprobs alone: the token's own, no alternatives
    plain = client.chat.completions.create(model="default", temperature=0, max_tokens=4, messages=question)
    assert plain.choices[0].logprobs is None
    text = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="default", max_tokens=4, messages=question, logprobs=True,
                                       top_logprobs=21)
    assert refused.value.body["param"] == "top_logprobs" and "0 to 20" in refused.value.body["message"]


def test_min_p_of_one_keeps_only_the_likeliest_token(client):
    question = [{"role": "user", "content": "Write one sentence about rivers."}]
    greedy = client.chat.completions.create(model="default", temperature=0, max_tokens=16, messages=question)
    for seed in (1, 2):
        hot = client.chat.completions.create(model="default", temperature=1.5, max_tokens=16, messages=question,
                                             seed=seed, extra_body={"min_p": 1.0})
        assert hot.choices[0].message.content == greedy.choices[0].message.content


def test_embedding_dimensions_only_the_models_own_width(client):
    same = client.embeddings.create(model="default", input="a valve", dimensions=384)
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="default", input="a valve", dimensions=64)
    assert refused.value.body["param"] == "dimensions" and "384" in refused.value.body["message"]


def test_one_model_by_id_and_the_wrong_method_is_405(client, api):
    assert client.models.retrieve("SmolLM2-135M-Instruct-int4").id == "SmolLM2-135M-Instruct-int4"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    r = httpx.get(f"{api}/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.delete(f"{api}/v1/models", headers=auth()).status_code == 405
    assert httpx.get(f"{api}/v1/nowhere", headers=auth()).status_code == 404
