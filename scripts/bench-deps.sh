#!/usr/bin/env bash
# Optional benchmark anchor: llama-cpp-python (llama.cpp on the embedded GGUF). One-off: about 5 minutes,
# llama.cpp builds from source for the machine it runs on (there is no wheel for this Python).
# A native (-march=native) build segfaulted on a Sapphire Rapids VM's first decode, so the instruction sets
# are chosen explicitly from /proc/cpuinfo: AVX-512 (+VNNI, +BF16) where present, else AVX2; AMX stays off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if has avx512f; then
  args+=" -DGGML_AVX512=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
elif has avx2; then
  args+=" -DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
fi
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already installed"
else
  echo "building llama-cpp-python 0.3.36 with CMAKE_ARGS=\"$args\" (about 5 minutes)"
  CMAKE_ARGS="$args" .venv/bin/pip install -q --disable-pip-version-check --no-binary llama-cpp-python \
    llama-cpp-python==0.3.36
fi
