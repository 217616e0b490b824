#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command (~6 min on an H100):
#     bash benchmarks/run_gpu.sh OUT_DIR
# Writes OUT_DIR/*.json (one file per benchmark) and OUT_DIR/benchmarks_gpu.md (the markdown tables).
# Each step has its own time limit and every benchmark records errors instead of stopping, so one
# failure never loses the other results.  Without CUDA every step records "skipped" and exits 0.
# Environment: PYTHON (default python3), BENCH_WORK (scratch folder, default /tmp/lsnet_bench_gpu).
set -u
OUT="${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}"
PY="${PYTHON:-python3}"
WORK="${BENCH_WORK:-/tmp/lsnet_bench_gpu}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT" "$WORK"
cd "$HERE/.."
T0=$(date +%s)
step() {  # step LIMIT_S NAME CMD...
  local limit=$1 name=$2; shift 2
  echo "=== [$(( $(date +%s) - T0 )) s] $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/log_$name.txt" 2>&1
  local rc=$?
  grep -E "start|done|ERROR|skipped|run [0-9]|CT " "$OUT/log_$name.txt" | tail -40
  echo "=== [$(( $(date +%s) - T0 )) s] $name finished (rc $rc; 124 = time limit, results so far are kept)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
E2E="$PY benchmarks/bench_e2e.py --device cuda --workdir $WORK --child-timeout 200"
# 1. end-to-end, 512x512x300: L-SNet (CLI default outputs and --no-heatmap), peers, the real CLI
step 200 e2e300 $E2E --slices 300 --repeats 3 --systems lsnet,lsnet_noheat,unet2d,coarse_to_fine,unet3d,cli --out "$OUT/e2e_gpu_300.json"
# 2. network throughput, eager grid (dtype x batch x channels-last) + peers' networks
step 100 net_eager $PY benchmarks/bench_networks.py --device cuda --phase eager --out "$OUT/networks_eager.json"
# 3. training throughput of the alternating step, widths 32 and 64, batch 32 and 64
step 100 training $PY benchmarks/bench_training.py --device cuda --min-time 3 --out "$OUT/training.json"
# 4. end-to-end, 512x512x1000 (L-SNet, 2-D U-Net, 3-D peer)
step 150 e2e1000 $E2E --slices 1000 --repeats 1 --systems lsnet,unet2d,unet3d --out "$OUT/e2e_gpu_1000.json"
# 5. L-SNet end-to-end with batch 32 instead of the CLI default 8
step 60 e2e300_b32 $E2E --slices 300 --repeats 3 --batch-size 32 --systems lsnet,lsnet_noheat --out "$OUT/e2e_gpu_300_b32.json"
# 6. CUDA graphs (eager capture), then torch.compile (time-boxed: autotuning may not finish)
step 45 net_graphs $PY benchmarks/bench_networks.py --device cuda --phase graphs --no-peers --out "$OUT/networks_graphs.json"
step 120 net_compile $PY benchmarks/bench_networks.py --device cuda --phase compile --no-peers --out "$OUT/networks_compile.json"
$PY benchmarks/report.py "$OUT" -o "$OUT/benchmarks_gpu.md" && echo "=== tables: $OUT/benchmarks_gpu.md"
echo "=== total $(( $(date +%s) - T0 )) s"
