"""A device without a broker: HTTP only (mqtt.enabled false), healthy once the model is loaded, and a clean
exit on SIGTERM in every broker state."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.harness import EDGELLM, ROOT, Broker, free_port, wait_for_port, wait_until


def serve(folder, model, *args: str, **env: str) -> tuple[subprocess.Popen, object]:
    log = folder / f"serve-{len(list(folder.iterdir()))}.log"
    proc = subprocess.Popen([*EDGELLM, "serve", "--model", str(model), *args], cwd=ROOT,
                            env={**os.environ, "EDGELLM_STATE_DIR": str(folder / "state"),
                                 "EDGELLM_MODEL__THREADS": "2", **env},
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    return proc, log


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_an_http_only_device_serves_is_healthy_and_stops_cleanly(tmp_path, smollm2_int4):
    port = free_port()
    proc, log = serve(tmp_path, smollm2_int4, "--http-port", str(port), EDGELLM_MQTT__ENABLED="false",
                      EDGELLM_MQTT__PORT="1")  # no broker anywhere: it must not even try
    try:
        wait_for_port(port, timeout=60)
        health = httpx.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        assert health.json()["mqtt"]["state"] == "disabled"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "default", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital city of France? Answer in one word."}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert rc == 0 and "stopped" in text and "Traceback" not in text, text[-2000:]
    assert "cannot reach the broker" not in text and "MQTT is off" in text


@pytest.mark.parametrize("broker_state", ["never reached", "gone mid-session"])
def test_sigterm_exits_0_whatever_the_broker_does(tmp_path, smollm2_int4, broker_state):
    broker = Broker(tmp_path).start()
    port = broker.port if broker_state == "gone mid-session" else free_port()
    if broker_state == "never reached":
        broker.stop()
    http = free_port()
    proc, log = serve(tmp_path, smollm2_int4, "--http-port", str(http), EDGELLM_MQTT__HOST="127.0.0.1",
                      EDGELLM_MQTT__PORT=str(port))
    try:
        wait_for_port(http, timeout=60)
        if broker_state == "gone mid-session":
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{http}/health").status_code == 200, 30,
                       "the daemon to connect")
            broker.stop()
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{http}/health").status_code == 503, 30,
                       "the daemon to notice the broker is gone")
        else:
            assert httpx.get(f"http://127.0.0.1:{http}/health").json()["mqtt"]["state"] != "connected"
        time.sleep(0.5)
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text and "stopped" in text, text[-2000:]


def test_nothing_to_serve_on_is_refused_naming_the_setting(tmp_path, smollm2_int4):
    r = subprocess.run([*EDGELLM, "serve", "--model", str(smollm2_int4)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "EDGELLM_MQTT__ENABLED": "false"})
    assert r.returncode == 2 and "mqtt.enabled" in r.stderr and "http" in r.stderr, r.stderr
