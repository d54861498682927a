"""The daemon: settings, the served models, the worker queue, the MQTT and HTTP transports, telemetry and
metrics, systemd notification, the request journal, and the MQTT client the CLI uses."""
