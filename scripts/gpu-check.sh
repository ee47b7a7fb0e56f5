#!/usr/bin/env bash
# The GPU checks of issue #8, on a machine with an NVIDIA GPU and onnxruntime-gpu installed:
#
#     bash scripts/gpu-check.sh [OUT_DIR]          # default OUT_DIR: gpu-check
#
# 1. the tests marked `gpu` (tests/engine/test_cuda_provider.py, tests/bench/test_gpu_kernels.py):
#    the nvidia-gpu profile's int4 and fp16 bundles of the demo model on the CUDA provider
#    against torch, the KV cache in device memory, every node on the GPU, CUDA graphs giving
#    plain CUDA's tokens, a decode step copying only a token in and the logits out;
# 2. benchmarks/gpu_decode.py on a Code Llama 7B-shaped random checkpoint, int4 and fp16,
#    with and without CUDA graphs, against the GPU's measured bandwidth, beside
#    onnxruntime-genai's CUDA model of the same checkpoint where onnxruntime-genai-cuda is
#    installed. The checkpoint
#    and the exports (CPU work) run while the tests do; the timed part runs alone;
# 3. benchmarks/gpu_kernels.py on our bundles, with and without CUDA graphs: every kernel
#    and copy of a decode step, traced on the GPU (needs PyTorch with CUDA);
# 4. int4 in the layout onnxruntime's TensorRT-LLM int4 kernels take (symmetric blocks of 32,
#    `--block-size 32 --symmetric true`), beside onnxruntime-genai's int4 at block 32: with
#    onnxruntime's own MatMulNBits kernel, and with the TensorRT-LLM ones
#    (`--session-config ep.cuda.fpa_intb_gemm=1`, a profile's session_config), traced too.
#
# Environment: PYTHON (default python3), LAYERS (decoder layers of the 7B-shaped
# checkpoint, default 32), WORKDIR (checkpoint and bundles; default a temporary folder),
# STAGE: all (default), or prepare (1 and the bundles) then bench (2, 3 and 4) as two runs over
# the same WORKDIR, where one run may not last long enough for all of it.
set -uo pipefail
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
# onnxruntime-gpu lists CUDA even when its libraries (CUDA, cuDNN) cannot load, and then runs
# on the CPU with a warning: start a one-node session to know, before any long step
"$py" - <<'PY' || exit 1
import sys
import onnxruntime as ort
from onnx import TensorProto, helper
print("onnxruntime", ort.__version__, ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
model = helper.make_model(helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                          ir_version=8, opset_imports=[helper.make_opsetid("", 13)])  # any onnxruntime >= 1.14 reads it
def started():
    return ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"]).get_providers()
if "CUDAExecutionProvider" not in started() and hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # the CUDA and cuDNN libraries of pip's nvidia-* packages (onnxruntime >= 1.21)
    if "CUDAExecutionProvider" in started():
        sys.exit("CUDA starts only after onnxruntime.preload_dlls(): put the nvidia-*/lib folders on LD_LIBRARY_PATH")
if "CUDAExecutionProvider" not in started():
    sys.exit("onnxruntime-gpu cannot start CUDA here (missing CUDA or cuDNN libraries? see the warning above)")
print("a CUDA session starts")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
stage=${STAGE:-all}
case $stage in all|prepare|bench) ;; *) echo "STAGE must be all, prepare or bench, not $stage"; exit 2 ;; esac
if [ "$stage" != all ] && [ -z "${WORKDIR:-}" ]; then
    echo "STAGE=$stage needs WORKDIR: the bundles stay there between the two stages"; exit 2
fi
work=${WORKDIR:-$(mktemp -d)}
mkdir -p "$work"
# the checkpoint and bundles are tens of GB: a temporary folder goes however the script ends
[ -z "${WORKDIR:-}" ] && trap 'rm -rf "$work"' EXIT
SECONDS=0
tests=0
if [ "$stage" != bench ]; then
    # the second export waits for the checkpoint the first builds; its failure leaves steps 2 and 3 to run
    { "$py" benchmarks/gpu_decode.py --synthetic-7b "$work/checkpoint" --layers "${LAYERS:-32}" \
        --workdir "$work/bundles" --peers --prepare-only >"$work/bundles.txt" 2>"$out/prepare.log" &&
      { "$py" benchmarks/gpu_decode.py --synthetic-7b "$work/checkpoint" --workdir "$work/b32sym" --precision int4 \
          --block-size 32 --symmetric true --peers --prepare-only >"$work/b32sym.txt" 2>>"$out/prepare.log" ||
        { echo "preparing the block-32 symmetric bundles failed (step 4 will say so)" >&2; rm -f "$work/b32sym.txt"; }; }
    } &
    prepare=$!
    "$py" -m pytest -m gpu -v -rA -p no:cacheprovider tests/engine/test_cuda_provider.py tests/engine/test_roofline.py \
        tests/bench/test_gpu_kernels.py 2>&1 | tee "$out/pytest-gpu.log"
    tests=${PIPESTATUS[0]}
    echo "gpu tests: exit $tests (${SECONDS} s)"
    if ! wait "$prepare"; then
        tail -50 "$out/prepare.log"
        echo "gpu tests: exit $tests; preparing the benchmark's bundles failed"
        exit 1
    fi
    echo "bundles prepared (${SECONDS} s): $(tr '\n' ' ' <"$work/bundles.txt")"
    [ "$stage" = prepare ] && exit "$tests"
fi
if [ ! -s "$work/bundles.txt" ]; then
    echo "$work/bundles.txt is missing: run STAGE=prepare with this WORKDIR first"; exit 2
fi
mapfile -t bundles <"$work/bundles.txt"   # ours, then onnxruntime-genai's where it is installed
"$py" benchmarks/gpu_decode.py "${bundles[@]/#/--bundle=}" --out "$out/gpu-decode" 2>&1 | tee "$out/gpu-decode.log"
bench=${PIPESTATUS[0]}
echo "benchmark: exit $bench (${SECONDS} s)"
# 3. where a decode step's time goes: each kernel of our bundles' steps, traced on the GPU
kernels=0
for b in "${bundles[@]}"; do
    [ -f "$b/bundle.json" ] || continue
    for variant in cuda cuda-graph; do
        name=kernels-$(basename "$b")-$variant
        "$py" benchmarks/gpu_kernels.py --bundle "$b" --variant "$variant" --json "$out/$name.json" 2>&1 \
            | tee "$out/$name.txt"
        [ "${PIPESTATUS[0]}" = 0 ] && continue
        # a CUDA graph recorded before the profiler's first use may not trace: once more, warmed up
        "$py" benchmarks/gpu_kernels.py --bundle "$b" --variant "$variant" --json "$out/$name.json" \
            --profiler-warmup 2>&1 | tee -a "$out/$name.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || kernels=1
    done
done
# 4. symmetric blocks of 32: onnxruntime's MatMulNBits kernel, then its TensorRT-LLM int4 kernels
layouts=0
if [ -s "$work/b32sym.txt" ]; then
    mapfile -t b32 <"$work/b32sym.txt"   # our int4, then onnxruntime-genai's int4 at block 32
    fpa=(--session-config ep.cuda.fpa_intb_gemm=1)
    "$py" benchmarks/gpu_decode.py "${b32[@]/#/--bundle=}" --variants cuda-graph --out "$out/gpu-decode-b32sym" \
        2>&1 | tee "$out/gpu-decode-b32sym.log"
    layouts=${PIPESTATUS[0]}
    "$py" benchmarks/gpu_decode.py --bundle="${b32[0]}" --variants cuda-graph cuda "${fpa[@]}" \
        --out "$out/gpu-decode-b32sym-fpa" 2>&1 | tee "$out/gpu-decode-b32sym-fpa.log"
    layouts=$(( layouts || PIPESTATUS[0] ))
    "$py" benchmarks/gpu_kernels.py --bundle "${b32[0]}" --variant cuda-graph "${fpa[@]}" \
        --json "$out/kernels-b32sym-fpa.json" 2>&1 | tee "$out/kernels-b32sym-fpa.txt"
    if [ "${PIPESTATUS[0]}" != 0 ]; then  # as in step 3: once more, the profiler warmed up
        "$py" benchmarks/gpu_kernels.py --bundle "${b32[0]}" --variant cuda-graph "${fpa[@]}" --profiler-warmup \
            --json "$out/kernels-b32sym-fpa.json" 2>&1 | tee -a "$out/kernels-b32sym-fpa.txt"
        layouts=$(( layouts || PIPESTATUS[0] ))
    fi
else
    echo "$work/b32sym.txt is missing: the block-32 symmetric bundles were not prepared"; layouts=1
fi
echo "gpu tests: exit $tests; benchmark: exit $bench; kernel traces: exit $kernels; int4 layouts: exit $layouts" \
     "(${SECONDS} s)"
exit $(( tests || bench || kernels || layouts ))
