#!/bin/bash
# Runs benchmark commands the way docs/results.md measures them on a nested
# machine whose host reclaims freed memory (free-page reporting):
#   1. turns host free-page reporting off (page_reporting_order 11);
#   2. touches the machine's free memory once, in 2 MiB pages, then frees it,
#      so that no run pays the host's first touch of memory it never backed
#      (about 1.8 s per GiB here; it falls on whichever run the allocator
#      hands never-touched memory, and on huge pages most of all);
#   3. runs each argument as a command, in order;
#   4. restores reporting (its old value) on exit, even after an error.
#
# Usage (root): benches/quiet.sh 'ringfault bench --compare classic --runs 3' ...
# Environment: WARM_RESERVE_MIB (default 2048) is left untouched by the warm-up.
set -euo pipefail

knob=/sys/module/page_reporting/parameters/page_reporting_order
if [[ $# -eq 0 ]]; then
    echo "usage: $0 'COMMAND' ['COMMAND' ...]" >&2
    exit 2
fi
if [[ -w $knob ]]; then
    old=$(cat "$knob")
    trap 'echo "$old" > "$knob"; echo "quiet.sh: page_reporting_order restored to $old" >&2' EXIT
    echo 11 > "$knob"
    echo "quiet.sh: host free-page reporting off (was $old)" >&2
else
    echo "quiet.sh: $knob is not writable here: reporting left as it is" >&2
fi

reserve=${WARM_RESERVE_MIB:-2048}
python3 - "$reserve" <<'EOF'
import mmap, sys, time
reserve = int(sys.argv[1]) << 20
avail = 0
with open("/proc/meminfo") as f:
    for line in f:
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) << 10
size = (max(avail - reserve, 0) >> 21) << 21
if size == 0:
    print("quiet.sh: too little free memory to warm", file=sys.stderr)
    sys.exit(0)
t = time.monotonic()
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
view = memoryview(m)
step = 256 << 20
for off in range(0, size, step):
    n = min(step, size - off)
    view[off:off + n:4096] = b"\x01" * (n // 4096)
view.release()
m.close()
print(f"quiet.sh: warmed {size / 2**30:.1f} GiB of free memory in {time.monotonic() - t:.1f} s",
      file=sys.stderr)
EOF

for cmd in "$@"; do
    echo "quiet.sh: $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $cmd" >&2
    bash -c "$cmd"
done
