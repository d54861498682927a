#!/usr/bin/env bash
# The test command: set up everything the tests need on a fresh machine, lint, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check daemon models scripts tests
.venv/bin/python -m pytest -q "$@"
