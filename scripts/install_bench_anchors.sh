#!/usr/bin/env bash
# The benchmark's anchors, each in its own venv under .cache/ (they cannot share ours):
#  - llama-cpp-python, built from source without the AMX kernels that crash here (~18 minutes);
#  - onnxruntime-genai and its model builder, which needs a transformers release optimum-onnx excludes.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
# Built for this CPU (GGML_NATIVE), but never with the AMX kernels: on the Intel hosts we measured on, the
# native build died with "illegal instruction" in them on the first eval. A build pinned to AVX-512 instead
# dies the same way on CPUs without it (AMD EPYC hosts here have AVX2 only).
if [ ! -x .cache/anchors/bin/python ] || ! .cache/anchors/bin/python -c "import llama_cpp" 2>/dev/null \
    || ! .cache/anchors/bin/python -c "import llama_cpp; llama_cpp.llama_backend_init()" 2>/dev/null; then
  rm -rf .cache/anchors
  "$python" -m venv .cache/anchors
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    .cache/anchors/bin/pip install --quiet --no-cache-dir llama-cpp-python numpy
fi
if [ ! -x .cache/genai/bin/python ] || ! .cache/genai/bin/python -c "import onnxruntime_genai" 2>/dev/null; then
  "$python" -m venv .cache/genai
  .cache/genai/bin/pip install --quiet torch==2.13.0
  .cache/genai/bin/pip install --quiet onnxruntime-genai transformers onnx onnx-ir gguf accelerate
fi
echo "anchors ready"
