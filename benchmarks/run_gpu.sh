#!/usr/bin/env bash
# The GPU run recorded in docs/benchmarks.md: the backend-parametrised tests and the GPU
# property tests on CuPy, torch CUDA and JAX (GPU), then benchmarks/gpu_report.py.
#   bash benchmarks/run_gpu.sh [OUTDIR]
# Needs a CUDA GPU, kronsum importable, cupy, torch, jax, pytest and hypothesis.
set -uo pipefail
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import sys, numpy, cupy, torch, jax; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__, 'jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
KRONSUM_TEST_BACKENDS=${KRONSUM_TEST_BACKENDS:-cupy,torch-cuda,jax} timeout "${TEST_TIMEOUT:-330}" \
  python3 -m pytest -p no:cacheprovider -q --maxfail=40 \
  tests/test_gpu.py tests/test_backends.py tests/test_inverse.py tests/test_kronsvd.py \
  tests/test_running.py tests/test_solver_sync.py tests/test_accelerator_routes.py 2>&1 | tee "$out/tests.log" | tail -n 60
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/gpu_report.py --json "$out/gpu_report.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
