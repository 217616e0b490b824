#!/usr/bin/env bash
# The same-session CPU comparison of docs/benchmarks.md "Current results" (issue 15) in ONE command.
# Run it on an IDLE machine (nothing else running: the load average is recorded with every row):
#     bash benchmarks/run_cpu_all.sh OUT_DIR [SAMPLE_CT]
# Inputs: the synthetic 512 x 512 x 300 CT, the NIH volume (NIH_CT, default
# /work/shared/data/pancreas-ct/PANCREAS_0001, skipped with a note when missing) and the sample CT
# when given (argument 2 or SAMPLE_CT; any path).  Systems: L-SNet (CLI outputs, --no-heatmap), the
# 2-D U-Net, the 2-D coarse-to-fine cascade, the 3-D sliding-window peer (FULL window: every patch,
# once, because it takes minutes) and the real CLI; medians of 3 runs for systems under a minute; peak
# RAM per system (child-process ru_maxrss); ratios to L-SNet per input.  Then the Slicer module's path
# ("time to result after Segment").  Writes OUT_DIR/e2e_cpu_same_run.json, OUT_DIR/slicer_path_cpu.json,
# logs, and the Markdown tables OUT_DIR/benchmarks_cpu_current.md (paste into docs/benchmarks.md).
# Environment: PYTHON (default python3), BENCH_WORK (scratch, default /tmp/lsnet_bench_cpu_all),
# NIH_CT, SAMPLE_CT, THREADS (torch threads, default: torch's choice = all cores).
set -u
OUT="${1:?usage: bash benchmarks/run_cpu_all.sh OUT_DIR [SAMPLE_CT]}"
PY="${PYTHON:-python3}"
WORK="${BENCH_WORK:-/tmp/lsnet_bench_cpu_all}"
NIH="${NIH_CT:-/work/shared/data/pancreas-ct/PANCREAS_0001}"
SAMPLE="${2:-${SAMPLE_CT:-}}"
cd "$(cd "$(dirname "$0")" && pwd)/.."
mkdir -p "$OUT" "$WORK"
INPUTS=(--slices 300)
if [ -e "$NIH" ]; then INPUTS+=(--real-ct "$NIH"); else echo "note: NIH volume $NIH not found: real-CT rows skipped"; fi
if [ -n "$SAMPLE" ]; then INPUTS+=(--sample-ct "$SAMPLE"); else echo "note: no sample CT given (argument 2 or SAMPLE_CT): its rows are skipped"; fi
E2E=("$PY" benchmarks/bench_e2e.py --device cpu --profile-all --peer-channels-last --repeat 3 --single-run-over 60
     --systems lsnet,lsnet_noheat,unet2d,coarse_to_fine,unet3d,cli --child-timeout 3600 --workdir "$WORK" --threads "${THREADS:-0}" "${INPUTS[@]}")
T0=$(date +%s)
echo "=== $(date -Is) commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- LSNetSegmentation benchmarks || echo ' (uncommitted changes!)'); 1-min load $(cut -d' ' -f1 /proc/loadavg) (want < 0.5: an idle machine)"
echo "=== runtime estimate (from older idle 2-core figures; the full 3-D window is ~9 min per 300 slices):"
"${E2E[@]}" --estimate-only 2>&1 | sed 's/^/    /'
echo "    + the Slicer path: 3 runs x (L-SNet time + ~5 s start-up, model load) per input, about 1-2 min"
echo "=== [$(( $(date +%s) - T0 )) s] end-to-end comparison (one bench_e2e.py invocation: every system, every input)"
"${E2E[@]}" --out "$OUT/e2e_cpu_same_run.json" > "$OUT/log_e2e.txt" 2>&1
echo "    rc $?; $(grep -c ERROR "$OUT/log_e2e.txt") errors (log: $OUT/log_e2e.txt)"
echo "=== [$(( $(date +%s) - T0 )) s] time to result after Segment (Slicer module's child process)"
"$PY" benchmarks/bench_slicer_path.py --device cpu --repeat 3 --workdir "$WORK/slicer" "${INPUTS[@]}" \
      --out "$OUT/slicer_path_cpu.json" > "$OUT/log_slicer_path.txt" 2>&1
echo "    rc $?; $(grep -c ERROR "$OUT/log_slicer_path.txt") errors (log: $OUT/log_slicer_path.txt)"
"$PY" benchmarks/report.py "$OUT/e2e_cpu_same_run.json" "$OUT/slicer_path_cpu.json" -o "$OUT/benchmarks_cpu_current.md"
echo "=== [$(( $(date +%s) - T0 )) s] tables: $OUT/benchmarks_cpu_current.md"
