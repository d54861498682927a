"""Home Assistant discovery over a real mosquitto, read as Home Assistant reads it: subscribe to the discovery
prefix, check each config against the MQTT sensor schema Home Assistant documents, then render each sensor's
value_template (Jinja, as Home Assistant does) on the retained message of its state topic."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Literal

import jinja2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel, ConfigDict

from tests.harness import EDGELLM, ROOT, DaemonProcess, retained, wait_until


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Availability(_Strict):
    topic: str
    value_template: str | None = None
    payload_available: str = "online"
    payload_not_available: str = "offline"


class Device(_Strict):
    identifiers: list[str]
    name: str
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None


class Origin(_Strict):
    name: str
    sw_version: str | None = None


class SensorConfig(_Strict):
    """The keys of Home Assistant's MQTT sensor that edgellm uses (home-assistant.io/integrations/sensor.mqtt)."""

    name: str
    unique_id: str
    object_id: str
    state_topic: str
    value_template: str
    availability: list[Availability]
    device: Device
    origin: Origin
    unit_of_measurement: str | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    icon: str | None = None
    entity_category: Literal["config", "diagnostic"] | None = None
    device_class: str | None = None  # with "enum", `options` lists the values; "data_size" needs a byte unit
    options: list[str] | None = None


class ButtonConfig(_Strict):
    """Home Assistant's MQTT button, the keys edgellm uses (home-assistant.io/integrations/button.mqtt)."""

    name: str
    unique_id: str
    object_id: str
    command_topic: str
    payload_press: str = "PRESS"
    availability: list[Availability]
    device: Device
    origin: Origin
    entity_category: Literal["config", "diagnostic"] | None = None
    icon: str | None = None
    qos: Literal[0, 1, 2] = 0


def retained_under(port: int, pattern: str, settle: float = 2.0, at_least: int = 0,
                   timeout: float = 60.0) -> dict[str, bytes]:
    """The retained messages under `pattern`: what arrives within `settle` seconds, or, with `at_least`, once
    that many have arrived (waiting up to `timeout`: a daemon on a loaded machine publishes its discovery
    configs a while after it is up) and `settle` more seconds have passed without a new one."""
    got: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(pattern, qos=1)
    client.on_message = lambda _c, _u, msg: got.__setitem__(msg.topic, msg.payload) if msg.retain else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + timeout
    while len(got) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = -1
    while seen != len(got):  # settle: until nothing new came for `settle` seconds
        seen = len(got)
        time.sleep(settle)
    client.disconnect()
    client.loop_stop()
    return got


def render(template: str, payload: bytes) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload)).strip()


def node_red_flow_round_trip(port: int, device: str) -> None:
    """The MQTT messages docs/node-red-flow.json sends (its inject payload, topic, Response Topic, Correlation
    Data and expiry, read from the flow itself) get the reply its debug node shows. Node-RED is not run here."""
    import re

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.harness import ROOT

    nodes = {n["id"]: n for n in json.loads((ROOT / "docs/node-red-flow.json").read_text())}
    func = nodes["edgellm_request"]["func"]
    topic = re.search(r"msg.topic = '([^']+)'", func).group(1).replace("dev-a", device)
    reply_topic = re.search(r"msg.responseTopic = '([^']+)'", func).group(1)
    assert nodes["edgellm_replies"]["topic"] == reply_topic and nodes["edgellm_broker"]["protocolVersion"] == "5"
    got, event = [], threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = lambda _c, _u, msg: (got.append(msg), event.set())
    client.connect("127.0.0.1", port)
    client.subscribe(reply_topic, qos=1)
    client.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval = reply_topic, b"1764500000000", 120
    client.publish(topic, nodes["edgellm_ask"]["payload"], qos=1, properties=props)
    try:
        assert event.wait(60), "no reply on the flow's reply topic"
    finally:
        client.disconnect()
        client.loop_stop()
    reply = json.loads(got[0].payload)
    assert reply["ok"] and reply["text"].strip() and got[0].properties.CorrelationData == b"1764500000000"


@pytest.mark.slow
def test_discovery_configs_and_the_values_they_read(broker, smollm2_int4, tmp_path):
    d = DaemonProcess(tmp_path, broker.port, smollm2_int4, device="gw-7",
                      env={"EDGELLM_HOMEASSISTANT__ENABLED": "true", "EDGELLM_TELEMETRY_INTERVAL": "600"}).start()
    try:
        published = retained_under(broker.port, "homeassistant/#", at_least=9)
        button = ButtonConfig.model_validate_json(published.pop("homeassistant/button/edgellm_gw_7/reload/config"))
        configs = {t: SensorConfig.model_validate_json(p) for t, p in published.items()}
        assert {t.split("/")[-2] for t in configs} == {"model", "model_version", "queue_depth", "tokens_per_second",
                                                         "requests", "errors", "memory", "cpu_temperature"}
        by_key = {t.split("/")[-2]: c for t, c in configs.items()}  # (no update sensor: updates are off)
        assert by_key["requests"].state_class == by_key["errors"].state_class == "total_increasing"
        assert by_key["queue_depth"].state_class == "measurement"
        assert {k for k, c in by_key.items() if c.entity_category == "diagnostic"} == {
            "model", "model_version", "memory", "cpu_temperature"}
        assert all(t.startswith("homeassistant/sensor/edgellm_gw_7/") for t in configs)
        assert len({c.unique_id for c in configs.values()}) == len(configs)
        values = {}
        for topic, c in configs.items():
            # telemetry is every 600 s here: the sensors read the retained one published at connect
            values[topic.split("/")[-2]] = render(c.value_template, retained(broker.port, c.state_topic))
            (a,) = c.availability
            assert render(a.value_template, retained(broker.port, a.topic)) == a.payload_available
        assert values["model"] == "SmolLM2-135M-Instruct-int4" and values["queue_depth"] == "0"
        assert float(values["tokens_per_second"]) == 0.0 and values["model_version"] == "1"  # nothing decoded yet
        assert values["errors"] == "0" and 50 < float(values["memory"]) < 4000
        assert values["cpu_temperature"] == "unknown" or -40 < float(values["cpu_temperature"]) < 120
        node_red_flow_round_trip(broker.port, "gw-7")
        assert button.command_topic == "edgellm/v1/gw-7/command/reload" and button.entity_category == "config"
        assert button.device == by_key["model"].device and button.availability == by_key["model"].availability
        press = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        press.connect("127.0.0.1", broker.port)
        press.loop_start()
        press.publish(button.command_topic, button.payload_press, qos=1).wait_for_publish(10)
        press.disconnect()
        press.loop_stop()
        wait_until(lambda: "now serving" in d.log.read_text(), timeout=60, what="the model reloaded")
        assert "reload requested on edgellm/v1/gw-7/command/reload" in d.log.read_text()
        assert render(by_key["model"].value_template, retained(broker.port, by_key["model"].state_topic)) == \
            "SmolLM2-135M-Instruct-int4"  # and it serves again
    finally:
        assert d.stop() == 0
    (a,) = next(iter(configs.values())).availability
    assert render(a.value_template, retained(broker.port, a.topic)) == a.payload_not_available
    # retired for good: `fleet forget` removes its entities from Home Assistant too
    out = subprocess.run([*EDGELLM, "fleet", "forget", "gw-7", "--mqtt-host", "127.0.0.1", "--mqtt-port",
                          str(broker.port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert retained_under(broker.port, "homeassistant/#", settle=1.0) == {}
    assert retained_under(broker.port, "edgellm/v1/gw-7/#", settle=1.0) == {}


@pytest.mark.slow
def test_discovery_is_opt_in(broker, smollm2_int4, tmp_path):
    d = DaemonProcess(tmp_path, broker.port, smollm2_int4, device="gw-8").start()
    try:
        assert retained_under(broker.port, "homeassistant/#", settle=1.0) == {}
    finally:
        d.stop()


def test_the_update_sensor_is_an_enum_of_every_state_the_agent_reports():
    from edgellm.daemon.serve.homeassistant import discovery_messages
    from edgellm.daemon.update.states import UpdateState

    topics = {"status": "s", "telemetry": "t", "update": "u", "reload": "r"}
    configs = {t.split("/")[-2]: SensorConfig.model_validate_json(p)
               for t, p in discovery_messages("homeassistant", "gw-9", topics, updates=True).items()
               if "/sensor/" in t}
    update = configs["update_state"]
    assert update.device_class == "enum" and update.options == [s.value for s in UpdateState]
    assert update.state_topic == "u" and "SUCCEEDED" in update.options


def test_home_assistant_itself_accepts_every_config():
    """Home Assistant's own MQTT discovery schemas (the sensor and button platforms of homeassistant 2024.3.3,
    installed by scripts/setup.sh dev in .cache/ha-venv) accept each config and keep the keys we rely on. That
    release predates the MQTT sensor's `options` (it drops the key): SensorConfig above checks it as the
    current documentation describes."""
    from edgellm.daemon.serve.homeassistant import discovery_messages
    from tests.harness import ROOT

    python = ROOT / ".cache/ha-venv/bin/python"
    assert python.is_file(), "run scripts/setup.sh dev: it installs Home Assistant in .cache/ha-venv"
    topics = {"status": "edgellm/v1/gw-9/status", "telemetry": "edgellm/v1/gw-9/telemetry",
              "update": "edgellm/v1/gw-9/update", "reload": "edgellm/v1/gw-9/command/reload"}
    configs = {t: json.loads(p) for t, p in discovery_messages("homeassistant", "gw-9", topics, updates=True).items()}

    def check(payload: dict) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), str(ROOT / "tests/ha_schema_check.py")], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=300)

    r = check(configs)
    assert r.returncode == 0, r.stdout + r.stderr
    kept = json.loads(r.stdout)
    assert set(kept) == set(configs) and len(kept) == 10
    for topic, config in configs.items():
        dropped = set(config) - set(kept[topic]) - {"options"}  # (see the docstring)
        assert not dropped, f"{topic}: Home Assistant drops {dropped}"
    button = kept["homeassistant/button/edgellm_gw_9/reload/config"]
    assert {"command_topic", "payload_press", "entity_category"} <= set(button)
    bad = {**configs["homeassistant/sensor/edgellm_gw_9/requests/config"], "state_class": "growing"}
    r = check({"homeassistant/sensor/edgellm_gw_9/requests/config": bad})
    assert r.returncode == 1 and "state_class" in r.stdout  # the check can fail
