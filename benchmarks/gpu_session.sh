#!/usr/bin/env bash
# Everything a session lent a GPU machine runs there, one stage per `device` call (each under 10 minutes):
#
#   bash benchmarks/gpu_session.sh build      # install (CPU + CUDA extensions for this GPU), GPU tests
#   bash benchmarks/gpu_session.sh ops        # fused batch norm vs ATen/cuDNN, bandwidth vs a D2D copy
#   bash benchmarks/gpu_session.sh r18        # fp32 engine modes vs the published loop, CIFAR ResNet-18, batch 128
#   bash benchmarks/gpu_session.sh r18-lowp   # the same in bf16 and mixed, with peak memory
#   bash benchmarks/gpu_session.sh r50        # torchvision ResNet-50, 224x224, batch 128, bf16 modes
#   bash benchmarks/gpu_session.sh r50-run    # 2000 ANP iterations of ResNet-50 (issue 3's 3-minute target)
#   bash benchmarks/gpu_session.sh dist       # ANP over every GPU (NCCL) against one: step, collective time
#
# Results (JSON/CSV/markdown with device name, torch version and commit) and logs go to $OUT (the device
# tool brings them back) or benchmarks/results when OUT is unset; copy them into benchmarks/results/ and
# commit. Every stage starts with the install (fast when the machine is still warm and the build is there).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-build}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export TRITON_INTERPRET=0            # compiled Triton on the GPU (conftest only sets 1 where none is set)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}

install() {
  if ! $PY -c "import anp_fast._cuda_kernels" 2>/dev/null; then
    $PY -m pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
      || { tail -40 "$out/install.log"; exit 1; }
  fi
  $PY - <<'EOF'
import torch, anp_fast
from anp_fast import ops
print("torch", torch.__version__, "| device", torch.cuda.get_device_name(), "| batch-norm backends on cuda:",
      ops.backends("perturbed_batch_norm", "cuda"))
EOF
  # every compiled kernel against the eager op on this GPU (a failing one is disabled in every run anyway)
  $PY -m anp_fast.cli doctor | tee "$out/doctor.txt"
}

case "$stage" in
  build|ops|r18|r18-lowp|r50|r50-run|dist) ;;
  *) echo "unknown stage $stage (build | ops | r18 | r18-lowp | r50 | r50-run | dist)" >&2; exit 2 ;;
esac
install
case "$stage" in
  build)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    $PY -m pytest -q -x -p no:cacheprovider \
      tests/test_fused_batch_norm.py::test_cuda_backends_match_eager \
      tests/test_fused_layer_norm.py \
      tests/test_cuda_graphs.py::test_real_cuda_graph_matches_plain_run 2>&1 | tee "$out/gpu_tests.log" | tail -25
    ;;
  ops)
    $PY -m anp_fast_bench.ops_bench --device cuda --out "$out" 2>&1 | tee "$out/ops.log" | tail -40
    ;;
  r18)
    anp-fast bench --device cuda --model cifar_resnet18 --batch 128 --rounds 5 --iters 5 --warmup 3 --no-memory \
      --modes published,cl,cl+merged+fused,cl+merged+compile,cl+merged+compile+fused,cl+merged+compile+fused+graphs \
      --out "$out" 2>&1 | tee "$out/r18.log" | tail -15
    ;;
  r18-lowp)
    anp-fast bench --device cuda --model cifar_resnet18 --batch 128 --rounds 5 --iters 5 --warmup 3 \
      --modes published,cl+bf16+merged+fused,cl+bf16+merged+compile+fused+graphs,cl+mixed+merged+compile+fused+graphs \
      --out "$out" 2>&1 | tee "$out/r18_lowp.log" | tail -15
    ;;
  r50)
    anp-fast bench --device cuda --model tv_resnet50 --batch 128 --rounds 3 --iters 3 --warmup 3 --no-memory \
      --modes published,cl+merged+fused,cl+bf16+merged+fused,cl+bf16+merged+compile+fused,cl+bf16+merged+compile+fused+graphs \
      --out "$out" 2>&1 | tee "$out/r50.log" | tail -25
    ;;
  r50-run)
    $PY -m anp_fast_bench.timed_run --model tv_resnet50 --batch 128 --iters 2000 --device cuda \
      --precision bf16 --compile --cuda-graphs --out "$out" 2>&1 | tee "$out/r50_run.log" | tail -15
    ;;
  dist)
    gpus=$(nvidia-smi -L | wc -l)
    if [ "$gpus" -lt 2 ]; then
      echo "dist: $gpus GPU here; ANP over several processes needs one GPU each (NCCL): nothing to measure" \
        | tee "$out/dist.log"
    else
      anp-fast bench --nproc "$gpus" --device cuda --model tv_resnet50 --batch 128 --mode cl+bf16+fused \
        --rounds 3 --iters 5 --warmup 3 --out "$out" 2>&1 | tee "$out/dist.log" | tail -12
    fi
    ;;
esac
