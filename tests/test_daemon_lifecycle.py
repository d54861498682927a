"""The daemon's life: configuration errors, broker outages, signals, the Last Will, systemd notifications."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import build
from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess, rpc, wait_status, wait_until

TOPIC = "edgellm/v1/dev1/rpc/"
LONG = {"prompt": "Write a long story about a lighthouse keeper.", "max_tokens": 200, "temperature": 0,
        "stream": True}


def serve_with_env(**env) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, "serve"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


@pytest.mark.slow
def test_invalid_configuration_exits_naming_the_field(tmp_path, smollm2_int4):
    r = serve_with_env(EDGELLM_MQTT__PORT="abc", EDGELLM_MODEL__PATH=str(smollm2_int4))
    assert r.returncode == 2 and "mqtt.port" in r.stderr and "EDGELLM_MQTT__PORT" in r.stderr
    r = serve_with_env(EDGELLM_MQTT__PORT="1884")
    assert r.returncode == 2 and "model.path is not set" in r.stderr
    (tmp_path / "bad.toml").write_text("[mqtt]\nport = 1884\ncolour = 'blue'\n")
    r = subprocess.run([*EDGELLM, "serve", "--config", str(tmp_path / "bad.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "mqtt.colour" in r.stderr


@pytest.mark.slow
def test_broker_down_at_start_then_up(tmp_path, daemon_factory):
    broker = Broker(tmp_path)
    d = daemon_factory(broker.port).start(wait=False)
    wait_until(lambda: "retrying with backoff" in d.log.read_text(), 60, "a failed connection attempt")
    assert d.proc.poll() is None  # it failed to connect, and keeps trying
    broker.start()
    try:
        d.wait_online(60)
        with rpc(broker.port) as c:
            assert c.call(TOPIC + "status", {})["ok"]
        assert d.stop() == 0
    finally:
        broker.stop()


@pytest.mark.slow
def test_broker_restart_mid_request_still_delivers_the_reply(broker, daemon_factory):
    daemon_factory(broker.port).start()
    first = threading.Event()
    with rpc(broker.port, session_expiry=300, client_id="survivor") as c:
        done, messages = c.send(TOPIC + "generate", {**LONG, "id": "through-outage"}, on_delta=lambda d: first.set())
        assert first.wait(30)
        broker.stop()
        time.sleep(1.0)
        broker.start()
        assert done.wait(90), "no final reply after the broker came back"
    assert messages[0]["ok"] and messages[0]["id"] == "through-outage"
    assert messages[0]["usage"]["completion_tokens"] > 50
    wait_status(broker.port, "dev1", "online", 30)


@pytest.mark.slow
def test_requests_sent_while_the_daemon_restarts_are_served(broker, daemon_factory):
    d = daemon_factory(broker.port).start()
    assert d.stop() == 0
    with rpc(broker.port) as c:
        done, messages = c.send(TOPIC + "status", {"id": "while-down"})
        time.sleep(0.5)
        assert not done.is_set()
        daemon_factory(broker.port).start()
        assert done.wait(60)
    assert messages[0]["ok"] and messages[0]["id"] == "while-down"


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_goes_offline(broker, daemon_factory):
    d = daemon_factory(broker.port).start()
    first = threading.Event()
    with rpc(broker.port) as c:
        done, messages = c.send(TOPIC + "generate", {**LONG, "id": "finish-me"}, on_delta=lambda _d: first.set())
        assert first.wait(30)
        d.signal(signal.SIGTERM)
        assert done.wait(60)
    assert messages[0]["ok"] and messages[0]["usage"]["completion_tokens"] > 50
    assert d.proc.wait(30) == 0
    assert wait_status(broker.port, "dev1", "offline", 10)["device"] == "dev1"


@pytest.mark.slow
def test_sigterm_past_the_grace_period_cancels_with_a_reply(broker, daemon_factory):
    d = daemon_factory(broker.port, edgellm_limits__grace_seconds=0.3).start()
    first = threading.Event()
    with rpc(broker.port) as c:
        done, messages = c.send(TOPIC + "generate", {**LONG, "max_tokens": 1000, "id": "cut"},
                                on_delta=lambda _d: first.set())
        assert first.wait(30)
        d.signal(signal.SIGTERM)
        assert done.wait(30)
    assert messages[0]["error"]["code"] == "cancelled" and "shutting down" in messages[0]["error"]["message"]
    assert d.proc.wait(30) == 0


def test_kill_9_leaves_the_last_will(broker, daemon_factory):
    d = daemon_factory(broker.port).start()
    d.proc.kill()
    d.proc.wait(10)
    assert wait_status(broker.port, "dev1", "lost", 20)["device"] == "dev1"


@pytest.mark.slow
def test_sighup_reloads_the_model_between_requests(broker, daemon_factory, tiny_sources, tmp_path):
    tiny = build(tiny_sources["llama"], tmp_path / "tiny", "int8")
    config = tmp_path / "edgellm.toml"
    d = daemon_factory(broker.port)
    config.write_text(f"[model]\npath = '{d.env['EDGELLM_MODEL__PATH']}'\n[limits]\nqueue_size = 3\n")
    del d.env["EDGELLM_MODEL__PATH"]
    d.proc = subprocess.Popen([*EDGELLM, "serve", "--config", str(config)], env=d.env,
                              cwd=ROOT, stderr=open(d.log, "a"))
    d.wait_online()
    with rpc(broker.port) as c:
        assert c.call(TOPIC + "status", {})["model"]["name"] == "SmolLM2-135M-Instruct-int4"
        config.write_text("[model\nbroken")
        d.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in d.log.read_text(), 30, "the refused reload")
        assert c.call(TOPIC + "status", {})["model"]["name"] == "SmolLM2-135M-Instruct-int4"
        config.write_text(f"[model]\npath = '{tiny}'\n")
        d.signal(signal.SIGHUP)
        wait_until(lambda: c.call(TOPIC + "status", {})["model"]["name"] == "llama-int8", 30, "the reload")
        assert c.call(TOPIC + "generate", {"prompt": "The invoice", "max_tokens": 3, "raw": True})["ok"]
    assert "not valid TOML" in d.log.read_text()
    assert d.stop() == 0


@pytest.mark.slow
def test_systemd_notify_ready_watchdog_and_stopping(broker, daemon_factory, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    d = daemon_factory(broker.port, notify_socket=path, watchdog_usec=400_000).start()
    messages: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    joined = "\n".join(messages)
    assert "READY=1" in joined and "STATUS=serving SmolLM2-135M-Instruct-int4" in joined
    assert joined.count("WATCHDOG=1") >= 3  # pinged from the worker loop, every half WatchdogSec
    d.signal(signal.SIGTERM)
    d.proc.wait(30)
    rest = []
    try:
        while True:
            rest.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in rest)
    sock.close()


# -- exactly one reply across a crash: the request journal ---------------------------------------------
def pending_in_journal(d: DaemonProcess) -> int:
    import sqlite3

    with sqlite3.connect(Path(d.env["EDGELLM_STATE_DIR"]) / "requests.db") as db:
        return db.execute("SELECT count(*) FROM requests WHERE done_at IS NULL").fetchone()[0]


@pytest.mark.slow
def test_a_request_in_flight_at_kill_9_is_answered_after_the_restart(broker, daemon_factory):
    d = daemon_factory(broker.port).start()
    first = threading.Event()
    with rpc(broker.port) as c:
        done, messages = c.send(TOPIC + "generate", {**LONG, "max_tokens": 400, "ignore_eos": True, "id": "crash"},
                                on_delta=lambda _d: first.set())
        late_done, late = c.send(TOPIC + "generate", {**LONG, "max_tokens": 400, "deadline_ms": 2500, "id": "late"})
        assert first.wait(30)
        d.proc.kill()  # SIGKILL: no grace, no reply, no offline status
        d.proc.wait(10)
        assert not done.is_set()
        time.sleep(3)  # the second request's deadline passes while the daemon is down
        daemon_factory(broker.port).start()
        assert done.wait(120) and late_done.wait(60)
    assert len(messages) == 1 and messages[0]["ok"] and messages[0]["id"] == "crash"
    assert messages[0]["usage"]["completion_tokens"] == 400
    assert late[0]["error"]["code"] == "deadline_exceeded" and late[0]["id"] == "late"


@pytest.mark.slow
def test_a_request_answered_before_kill_9_is_not_answered_again(broker, daemon_factory):
    d = daemon_factory(broker.port).start()
    with rpc(broker.port) as c:
        done, messages = c.send(TOPIC + "generate", {"prompt": "Say hi.", "max_tokens": 4, "id": "once"})
        assert done.wait(60) and messages[0]["ok"]
        deadline = time.monotonic() + 10
        while pending_in_journal(d) and time.monotonic() < deadline:  # done once the broker has the reply
            time.sleep(0.1)
        assert pending_in_journal(d) == 0
        d.proc.kill()
        d.proc.wait(10)
        d2 = daemon_factory(broker.port).start()
        assert c.call(TOPIC + "status", {})["ok"]  # replies are ordered: a replayed one would have come first
        assert len(messages) == 1
    assert d2.stop() == 0


@pytest.mark.slow
def test_a_request_the_client_gave_up_on_is_not_run_when_the_device_returns(broker, daemon_factory):
    """`edgellm request --timeout` sets the Message Expiry Interval, so the broker drops the queued request."""
    d = daemon_factory(broker.port).start()
    assert d.stop() == 0  # offline; its persistent session keeps queueing requests
    r = subprocess.run([*EDGELLM, "request", "generate", '{"prompt": "Say hi."}',
                        "--device", "dev1", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
                        "--timeout", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no reply" in r.stderr
    time.sleep(1.5)
    d = daemon_factory(broker.port).start()
    with rpc(broker.port) as c:
        time.sleep(1)
        assert "generate" not in c.call(TOPIC + "status", {})["requests"]
    assert d.stop() == 0


@pytest.mark.slow
def test_health_and_logs_say_when_the_broker_is_unreachable(tmp_path, daemon_factory):
    import httpx

    from tests.harness import free_port, wait_for_port

    port, http_port = free_port(), free_port()  # nothing listens on the broker port
    d = daemon_factory(port, edgellm_http__enabled="true", edgellm_http__port=http_port,
                       edgellm_mqtt__reconnect_max_delay=1).start(wait=False)
    wait_for_port(http_port, 60)
    # two failed attempts (it keeps retrying, with backoff up to 1 s here), each logged
    wait_until(lambda: d.log.read_text().count("cannot reach the broker") >= 2, 30, "two connection attempts")
    r = httpx.get(f"http://127.0.0.1:{http_port}/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert r.json()["mqtt"] == {"connected": False, "state": "unreachable"}  # where it is: only with the key
    (tmp_path / "late").mkdir()
    broker = Broker(tmp_path / "late", port=port).start()
    try:
        d.wait_online(30)
        r = httpx.get(f"http://127.0.0.1:{http_port}/health")
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["mqtt"]["connected"] is True
        assert d.stop() == 0
    finally:
        broker.stop()
