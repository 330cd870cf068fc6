#!/usr/bin/env bash
# On the GPU machine: where one block-decoder step and one token-decoder block
# spend their device time, per kernel, from Nsight Compute (clocks left alone),
# plus step_profile's timed pieces. BIN holds step_profile (xz or plain).
#   BIN=.dev/base bash bench/kernel-profile.sh "$OUT/profile" [batch] [keys]
# WHATS picks the brackets (default "token block"; "prefill" is one prefill
# pass of 32 prompts x 512 blocks). DETAIL=<kernel name regex> adds Nsight
# Compute's full sections (speed of light, occupancy, warp stalls, launch,
# memory) for the first two launches of that kernel in the prefill pass.
set -euo pipefail
BIN=${BIN:-.dev/bin}; OUTD=${1:-$OUT/profile}; B=${2:-2048}; K=${3:-288}
mkdir -p "$OUTD" /tmp/kp
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -x /tmp/kp/step_profile ] || { if [ -e "$BIN/step_profile.xz" ]; then xz -dc "$BIN/step_profile.xz" > /tmp/kp/step_profile; else cp "$BIN/step_profile" /tmp/kp/; fi; chmod +x /tmp/kp/step_profile; }
/tmp/kp/step_profile cuda bf16 "$B" "$K" | tee "$OUTD/pieces-$B.md"
for what in ${WHATS:-token block}; do
  PROFILE=$what ncu --clock-control none --profile-from-start off --csv --page raw --print-units base \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_elapsed.avg.per_second \
    /tmp/kp/step_profile cuda bf16 "$B" "$K" > "$OUTD/ncu-$what-$B.csv" 2> "$OUTD/ncu-$what-$B.err" || tail -5 "$OUTD/ncu-$what-$B.err"
  python3 - "$OUTD/ncu-$what-$B.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
h = rows[0]; data = rows[2:]
ki, ti = h.index("Kernel Name"), h.index("gpu__time_duration.sum")
ri, wi = h.index("dram__bytes_read.sum"), h.index("dram__bytes_write.sum")
units = rows[1]
def num(s): return float(s.replace(",", "")) if s else 0.0
ci = h.index("sm__cycles_elapsed.avg.per_second")
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
for r in data:
    name = r[ki].split("(")[0][:70]
    a = agg[name]; a[0] += 1; a[1] += num(r[ti]); a[2] += num(r[ri]) + num(r[wi]); a[3] += num(r[ci]) * num(r[ti])
tot = sum(a[1] for a in agg.values())
print(f"{sys.argv[1]}: {len(data)} kernels, {tot/1e3:.1f} us of device time (units: {units[ti]}, {units[ri]})")
print("| kernel | count | us | share | DRAM MB | GB/s | SM MHz |")
print("|---|---:|---:|---:|---:|---:|---:|")
for n, (c, t, b, f) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"| {n} | {c} | {t/1e3:.1f} | {100*t/tot:.1f}% | {b/1e6:.1f} | {b/t if t else 0:.0f} | {f/t/1e6 if t else 0:.0f} |")
PY
done
if [ -n "${DETAIL:-}" ]; then
  PROFILE=prefill ncu --clock-control none --profile-from-start off -k "regex:$DETAIL" -c 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section InstructionStats --section SourceCounters \
    /tmp/kp/step_profile cuda bf16 "$B" "$K" > "$OUTD/ncu-detail.txt" 2> "$OUTD/ncu-detail.err" || tail -5 "$OUTD/ncu-detail.err"
  grep -v "^==PROF==" "$OUTD/ncu-detail.txt" | grep -E "^  [A-Za-z]|^    [A-Z][A-Za-z /%-]+ +[A-Za-z/%]* +[0-9]|WRN|OPT" | head -${DETAIL_LINES:-150}
fi
