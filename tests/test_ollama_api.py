"""Ollama's API on the running daemon, driven by the official `ollama` Python client from PyPI, as Home
Assistant's Ollama integration, Open WebUI and n8n drive an Ollama server."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
from pydantic import BaseModel

from tests.harness import Broker, DaemonProcess, free_port, wait_for_port

KEY = "sk-edge-ollama"
CHAT = "SmolLM2-135M-Instruct-int4"


@pytest.fixture(scope="module")
def api(tmp_path_factory, smollm2_int4, minilm_int8):
    folder = tmp_path_factory.mktemp("ollama")
    broker = Broker(folder).start()
    port = free_port()
    d = DaemonProcess(folder, broker.port, smollm2_int4, device="ollama1", env={
        "EDGELLM_HTTP__ENABLED": "true", "EDGELLM_HTTP__PORT": str(port), "EDGELLM_HTTP__API_KEY": KEY,
        "EDGELLM_EMBEDDING__PATH": str(minilm_int8)}).start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    assert d.stop() == 0
    broker.stop()


@pytest.fixture
def client(api) -> ollama.Client:
    return ollama.Client(host=api, headers={"Authorization": f"Bearer {KEY}"})


GREEDY = {"temperature": 0, "num_predict": 24}
CAPITAL = [{"role": "user", "content": "What is the capital city of France? Answer in one word."}]


def test_chat_whole_and_streamed(client):
    r = client.chat(model=CHAT, messages=CAPITAL, options=GREEDY, stream=False)
    assert "Paris" in r.message.content and r.message.role == "assistant"
    assert r.done and r.done_reason in ("stop", "length") and r.eval_count > 0 and r.prompt_eval_count > 10
    assert r.model == CHAT + ":latest" and r.total_duration > 0
    parts = list(client.chat(model=CHAT + ":latest", messages=CAPITAL, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].eval_count == r.eval_count


def test_generate_with_a_system_prompt_and_raw(client):
    r = client.generate(model="default", prompt="What is the capital city of France? Answer in one word.",
                        system="You answer with one word.", options=GREEDY)
    assert "Paris" in r.response and r.done
    raw = client.generate(model=CHAT, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    assert raw.response.strip() and raw.eval_count == 4 and raw.done_reason == "length"
    streamed = "".join(p.response for p in client.generate(model=CHAT, prompt="The capital of France is", raw=True,
                                                            options={"temperature": 0, "num_predict": 4},
                                                            stream=True))
    assert streamed == raw.response


class City(BaseModel):
    name: str
    country: str


def test_structured_output_with_a_pydantic_schema_and_json(client):
    ask = [{"role": "user", "content": "Give the capital of France as JSON with its name and country."}]
    r = client.chat(model=CHAT, messages=ask, format=City.model_json_schema(), options={"temperature": 0})
    city = City.model_validate_json(r.message.content)
    assert city.name and city.country
    r = client.chat(model=CHAT, messages=ask, format="json", options={"temperature": 0, "num_predict": 64})
    assert isinstance(json.loads(r.message.content), dict)


def close_valve(valve: int) -> str:
    """Close a valve of the plant.

    Args:
      valve: the valve's number
    """
    return f"valve {valve} closed"


def test_tools_as_ollama_clients_pass_them(client):
    """The client turns a Python function into a tool; the model calls it with arguments of the declared types,
    and the call's result goes back as a tool turn."""
    ask = [{"role": "user", "content": "Close valve 3"}]
    r = client.chat(model=CHAT, messages=ask, tools=[close_valve], options={"temperature": 0})
    [call] = r.message.tool_calls
    assert call.function.name == "close_valve" and call.function.arguments == {"valve": 3}
    history = [*ask, r.message, {"role": "tool", "content": close_valve(**call.function.arguments),
                                 "tool_name": "close_valve"}]
    after = client.chat(model=CHAT, messages=history, options=GREEDY)
    assert after.message.content.strip() and not after.message.tool_calls


def test_embed_list_show_ps_version(client, api):
    listed = client.list().models
    names = [m.model for m in listed]
    assert names[0] == CHAT + ":latest" and len(names) == 2
    embedder = names[1]
    assert all(m.size > 1_000_000 and m.details.format == "onnx" for m in listed)
    vectors = client.embed(model=embedder, input=["close the valve", "open the valve"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-4
    single = client.embeddings(model=embedder, prompt="close the valve").embedding
    assert max(abs(a - b) for a, b in zip(single, vectors[0], strict=True)) < 1e-5
    shown = client.show(CHAT)
    assert "<|im_start|>" in shown.template and shown.details.family == "llama"
    assert shown.details.parameter_size == "135M"  # SmolLM2-135M's weights, counted when it was built
    assert shown.modelinfo["llama.context_length"] == 8192 and "tools" in shown.capabilities
    running = client.ps().models
    assert running[0].model == CHAT + ":latest" and running[0].context_length == 8192
    assert httpx.get(f"{api}/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]


def test_errors_in_ollamas_shape(client, api):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3.2", messages=CAPITAL)
    assert e.value.status_code == 404 and "llama3.2" in e.value.error and CHAT in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=CHAT, messages=CAPITAL, options={"temprature": 0})
    assert e.value.status_code == 400 and "options.temprature: unknown field; did you mean 'options.temperature'" \
        in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=CHAT, messages=CAPITAL, options={"mirostat": 2})
    assert e.value.status_code == 400 and "options.mirostat: not supported" in e.value.error
    # load options and keep_alive are accepted without effect: the daemon keeps its model loaded
    r = client.chat(model=CHAT, messages=CAPITAL, options={**GREEDY, "num_ctx": 4096, "num_gpu": 0},
                    keep_alive="5m")
    assert "Paris" in r.message.content
    r = httpx.post(f"{api}/api/chat", json={"model": CHAT, "messages": CAPITAL, "stream": False})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = httpx.post(f"{api}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": CHAT, "messages": CAPITAL, "stream": False, "strem": True})
    assert r.status_code == 400 and r.json() == {"error": "strem: unknown field; did you mean 'stream'?"}
    assert httpx.get(f"{api}/api/chat", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
