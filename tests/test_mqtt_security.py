"""TLS, passwords and the shipped ACL (docs/mosquitto/) on a real mosquitto: a device cannot read another's requests."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgellm.daemon.serve.client import RpcClient
from edgellm.daemon.serve.settings import Settings
from tests.harness import ROOT, Broker, DaemonProcess

DOCS = ROOT / "docs" / "mosquitto"
PASSWORDS = {"dev-a": "secret-a", "dev-b": "secret-b", "operator": "secret-op"}


def make_certs(folder: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=edgellm test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure-broker")
    (folder / "certs").mkdir()
    make_certs(folder / "certs")
    for i, (user, password) in enumerate(PASSWORDS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(folder / "edgellm.passwd"), user, password], check=True)
    (folder / "edgellm.acl").write_text((DOCS / "edgellm.acl").read_text())
    conf = (DOCS / "edgellm.conf").read_text().replace("/etc/mosquitto/", "{folder}/")
    conf = conf.replace("listener 8883", "listener {port} 127.0.0.1")
    broker = Broker(folder, conf=conf).start()
    yield broker
    broker.stop()


def tls_settings(broker: Broker, user: str, **mqtt_extra) -> Settings:
    return Settings(device_id=user, mqtt={"host": "127.0.0.1", "port": broker.port, "username": user,
                                          "password": PASSWORDS[user], "tls": {"enabled": True,
                                          "ca_file": str(broker.folder / "certs" / "ca.crt")}, **mqtt_extra})


def tls_client(broker: Broker, user: str, password: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spy-{user}", protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=str(broker.folder / "certs" / "ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
    return c


@pytest.fixture(scope="module")
def device_a(secure_broker, smollm2_int4, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dev-a")
    (folder / "password").write_text(PASSWORDS["dev-a"] + "\n")
    d = DaemonProcess(folder, secure_broker.port, smollm2_int4, device="dev-a", env={
        "EDGELLM_MQTT__USERNAME": "dev-a", "EDGELLM_MQTT__PASSWORD_FILE": str(folder / "password"),
        "EDGELLM_MQTT__TLS__ENABLED": "true", "EDGELLM_MQTT__TLS__CA_FILE": str(secure_broker.folder / "certs/ca.crt"),
        "EDGELLM_GROUPS": '["line1"]'})
    d.start(wait=False)
    deadline = time.monotonic() + 60
    while "serving" not in d.log.read_text() and time.monotonic() < deadline:
        assert d.proc.poll() is None, d.log.read_text()
        time.sleep(0.2)
    yield d
    assert d.stop() == 0


def test_operator_reaches_the_device_over_tls_with_a_password(secure_broker, device_a):
    with RpcClient(tls_settings(secure_broker, "operator")) as c:
        r = c.call("edgellm/v1/dev-a/rpc/generate", {"prompt": "Say hi.", "max_tokens": 5})
        assert r["ok"], r
        g = c.call("edgellm/v1/groups/line1/rpc/status", {})
        assert g["ok"] and g["device"] == "dev-a"


@pytest.mark.slow
def test_another_device_cannot_read_our_requests(secure_broker, device_a):
    seen: list[str] = []
    subscribed = threading.Event()
    spy = tls_client(secure_broker, "dev-b", PASSWORDS["dev-b"])
    spy.on_connect = lambda c, *_: c.subscribe([("edgellm/v1/dev-a/rpc/#", 1), ("edgellm/v1/replies/#", 1)])
    spy.on_subscribe = lambda *_: subscribed.set()
    spy.on_message = lambda _c, _u, m: seen.append(m.topic)
    spy.connect("127.0.0.1", secure_broker.port)
    spy.loop_start()
    assert subscribed.wait(10)  # mosquitto accepts the subscription, then filters what it would deliver
    with RpcClient(tls_settings(secure_broker, "operator")) as c:
        assert c.call("edgellm/v1/dev-a/rpc/generate", {"prompt": "A secret contract clause.", "max_tokens": 3})["ok"]
    time.sleep(0.5)
    # dev-b may not pretend to be dev-a either: its write to dev-a's status is dropped
    spy.publish("edgellm/v1/dev-a/status", json.dumps({"state": "offline"}), qos=1, retain=True).wait_for_publish(5)
    spy.loop_stop()
    spy.disconnect()
    assert seen == []
    with RpcClient(tls_settings(secure_broker, "operator")) as c:
        assert c.call("edgellm/v1/dev-a/rpc/status", {})["state"] == "online"


def test_a_wrong_password_is_refused(secure_broker):
    refused = threading.Event()
    c = tls_client(secure_broker, "dev-b", "wrong")
    c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure and refused.set()
    c.connect("127.0.0.1", secure_broker.port)
    c.loop_start()
    assert refused.wait(10)
    c.loop_stop()


@pytest.mark.slow
def test_plain_tcp_is_not_offered(secure_broker):
    accepted = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set("operator", PASSWORDS["operator"])
    c.on_connect = lambda _c, _u, _f, rc, _p: rc.is_failure or accepted.set()
    c.connect("127.0.0.1", secure_broker.port)
    c.loop_start()
    time.sleep(2)
    c.loop_stop()
    assert not accepted.is_set(), "the TLS listener accepted a plain MQTT client"
