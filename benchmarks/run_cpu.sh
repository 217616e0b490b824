#!/usr/bin/env bash
# The CPU measurements of the first 2026-11-23 session (docs/benchmarks.md, History), kept to
# reproduce them.  The current same-session comparison is benchmarks/run_cpu_all.sh.
#     bash benchmarks/run_cpu.sh OUT_DIR
# Here the 3-D sliding-window peer runs 2 of its patches on purpose (--max-patches-3d 2) and its rows
# say "network_time: extrapolated, 2/48 patches"; the default (0) is the full window.  Peers run
# channels-last on the CPU (their fastest form).
set -u
OUT="${1:?usage: bash benchmarks/run_cpu.sh OUT_DIR}"
PY="${PYTHON:-python3}"
WORK="${BENCH_WORK:-/tmp/lsnet_bench_cpu}"
cd "$(cd "$(dirname "$0")" && pwd)/.."
mkdir -p "$OUT"
C="--device cpu --profile-all --peer-channels-last --workdir $WORK --child-timeout 1500"
$PY benchmarks/bench_e2e.py $C --slices 300 --repeats 1 --systems lsnet,lsnet_cl,unet2d,coarse_to_fine --out "$OUT/e2e_cpu_300.json"
$PY benchmarks/bench_e2e.py $C --slices 300 --repeats 1 --max-patches-3d 2 --systems unet3d --out "$OUT/e2e_cpu_300_unet3d.json"
$PY benchmarks/bench_e2e.py $C --slices 1000 --repeats 1 --systems lsnet_cl,cli --out "$OUT/e2e_cpu_1000.json"
$PY benchmarks/bench_e2e.py $C --slices 300 --repeats 1 --systems cli,lsnet_noheat --out "$OUT/e2e_cpu_300_cli.json"
$PY benchmarks/report.py "$OUT" -o "$OUT/benchmarks_cpu.md"
