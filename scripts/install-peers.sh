#!/usr/bin/env bash
# Install the peers that benchmarks/peers.py (`edge-runtime bench --peers`) compares us with,
# in their own virtual environment, so nothing in the main environment changes:
#
#   ~/.cache/edge-runtime/peers-venv      python -m venv --system-site-packages (sees torch,
#                                         transformers, onnx, onnxruntime of the main environment)
#     onnxruntime-genai==0.15.2           its model builder; 0.16+ imports model classes that only
#                                         transformers 5 has (optimum's exporter needs < 4.58).
#                                         It uses the installed onnxruntime (>= 1.28), no other copy.
#     llama-cpp-python                    built from source with cmake (llama.cpp, CPU): about
#                                         15-25 minutes on 2 cores; the wheel is cached in
#                                         ~/.cache/edge-runtime/wheels and reused
#     gguf, sentencepiece                 read the GGUF file (bytes per tensor type); the converter imports both
#   ~/.cache/edge-runtime/peers/llama.cpp llama.cpp's convert_hf_to_gguf.py + gguf-py + conversion/,
#                                         taken from the same llama-cpp-python sdist (vendor/llama.cpp)
#   matplotlib (main environment)         the PNG plot; the benchmark skips the plot without it
#
# Not part of CI (.ci/run never builds llama.cpp). Needs python3-venv, cmake and a C++ compiler.
# Usage: bash scripts/install-peers.sh   (EDGE_RUNTIME_CACHE moves ~/.cache/edge-runtime)
#
# LLAMA_CPP_NO_AMX=1 builds llama.cpp for this CPU's instruction sets but without AMX (a wheel
# cached apart): on a virtual machine whose CPU reports AMX, llama.cpp's AMX kernel can die of an
# illegal instruction (SIGILL at tilezero in ggml_backend_amx_mul_mat), which benchmarks/peers.py
# reports as the llama.cpp row's failure; onnxruntime is not affected.
set -euo pipefail

PY=${PYTHON:-python3}
CACHE=${EDGE_RUNTIME_CACHE:-$HOME/.cache/edge-runtime}
VENV=$CACHE/peers-venv
WHEELS=$CACHE/wheels
PEERS=$CACHE/peers
GENAI_VERSION=0.15.2
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "install-peers: $tool is missing (apt-get install cmake g++)" >&2; exit 1; }
done
mkdir -p "$WHEELS" "$PEERS"
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
VPIP="$VENV/bin/python -m pip"

$VPIP install --quiet "onnxruntime-genai==$GENAI_VERSION" gguf sentencepiece

SDIST=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
    $VPIP download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$WHEELS"
    SDIST="$WHEELS/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fi
# llama.cpp's build: -march=native by default; with LLAMA_CPP_NO_AMX=1 the x86 instruction sets
# this CPU reports, named one by one (GGML_NATIVE=OFF), without AMX
BUILD_WHEELS=$WHEELS
CMAKE_FLAGS=""
if [ "${LLAMA_CPP_NO_AMX:-0}" = 1 ]; then
    BUILD_WHEELS=$WHEELS/no-amx
    CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512_vbmi:AVX512_VBMI avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        case "$cpu_flags" in *" ${pair%%:*} "*) CMAKE_FLAGS+=" -DGGML_${pair#*:}=ON" ;; esac
    done
    mkdir -p "$BUILD_WHEELS"
fi
WHEEL=$(ls "$BUILD_WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
    echo "install-peers: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama.cpp from source; slow)${CMAKE_FLAGS:+ with $CMAKE_FLAGS} ..." >&2
    CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) nice -n 10 \
        $VPIP wheel --no-deps "$SDIST" -w "$BUILD_WHEELS"
    WHEEL=$(ls "$BUILD_WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -n1)
fi
# the wheel chosen (native or without AMX) replaces whichever is installed, same version or not;
# --force-reinstall alone would reinstall its dependencies into the venv too, shadowing the main ones
$VPIP install --quiet --force-reinstall --no-deps "$WHEEL"
$VPIP install --quiet "$WHEEL"   # its dependencies: numpy, typing-extensions, diskcache, jinja2

# llama.cpp's HF -> GGUF converter, from the same sdist (the PyPI gguf may lag the converter)
rm -rf "$PEERS/llama.cpp"
mkdir -p "$PEERS/llama.cpp"
tar xzf "$SDIST" -C "$PEERS/llama.cpp" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/gguf-py" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/conversion"

"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install --quiet matplotlib

"$VENV/bin/python" -c "import onnxruntime_genai, llama_cpp, onnxruntime; print('peers ready: onnxruntime-genai', onnxruntime_genai.__version__, '/ llama-cpp-python', llama_cpp.__version__, '/ onnxruntime', onnxruntime.__version__)"
