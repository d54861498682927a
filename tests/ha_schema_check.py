"""Run by tests/test_homeassistant.py with the Python of .cache/ha-venv (Home Assistant 2024.3.3, the last
release for Python 3.11, installed by scripts/setup.sh dev beside our own venv: its pins clash with ours).
Reads {topic: config} on stdin and validates each config with Home Assistant's own MQTT discovery schema for
its platform, as Home Assistant does when the config arrives; prints {topic: the keys it kept} or, for the
first config it refuses, the error, and exits 1."""

import json
import sys

from homeassistant.components.mqtt import button, sensor

SCHEMAS = {"sensor": sensor.DISCOVERY_SCHEMA, "button": button.DISCOVERY_SCHEMA}

kept = {}
for topic, config in json.load(sys.stdin).items():
    platform = topic.split("/")[1]
    try:
        kept[topic] = sorted(SCHEMAS[platform](config))
    except Exception as e:  # voluptuous.Invalid, or a platform we do not know
        print(f"{topic}: {e}")
        sys.exit(1)
print(json.dumps(kept))
