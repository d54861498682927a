"""Publishing to a fleet: signed bundles and their deltas, low-rank remerges, staged rollouts, the host's MQTT
side."""
