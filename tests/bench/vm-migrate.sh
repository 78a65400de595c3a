#!/usr/bin/env bash
# Live migration of a running QEMU guest (TCG, writing random 4 KiB blocks with O_DIRECT the
# whole time): plain QEMU live migration with both QEMUs on one shared export (the floor: no
# disk work; also with pause-before-switchover and an immediate migrate-continue, QEMU's own
# cost of that pause) against rbdsync first-io and rbdsync manual (pause-before-switchover), RUNS
# migrations each (default 5; a fresh pair of agents and a fresh guest per run, since the
# source keeps its fenced copy). Guest-visible downtime: QEMU's `downtime` plus, for first-io,
# the rbdsync cut-over the resumed VM's first write waited for (for manual QEMU's downtime
# already spans the cut-over at pre-switchover). Bytes: what the mirrors sent, against
# (dirty since the backup + one 64 KiB granule per guest write during the migration).
#
# Usage: tests/bench/vm-migrate.sh   (env: RUNS=5, RBDSYNC_QEMU_ROOT as tests/run.sh sets it)
# Output: a Markdown table on stdout, also written to tests/bench/results/vm-migrate-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-5}
export RBDSYNC_QEMU_ROOT=${RBDSYNC_QEMU_ROOT:-$(pwd)/target/qemu-system}
mkdir -p tests/bench/results
out=tests/bench/results/vm-migrate-$(date +%Y%m%d-%H%M).md
raw=$(mktemp)
cargo build --release -q -p agent
VM_MIGRATE_RUNS=$RUNS VM_MIGRATE_MODES="shared first-io shared-pause manual" cargo test --release -q -p tests --test vm_migration -- --ignored bench_vm_migrate \
    --nocapture --test-threads=1 2>/dev/null | grep '^ROW' >"$raw"
python3 - "$raw" "$RUNS" <<'PY' | tee "$out"
import statistics, sys
rows = [l.split()[1:] for l in open(sys.argv[1])]
by = {}
for mode, qemu, cut, vis, total, sent, bound in rows:
    by.setdefault(mode, []).append(tuple(int(x) for x in (qemu, cut, vis, total, sent, bound)))
floor = statistics.median(r[2] for r in by.get("shared", [(0, 0, 0, 0, 0, 0)]))
print(f"| mode ({sys.argv[2]} runs) | guest-visible downtime median / max | over the floor (median) | QEMU downtime median | rbdsync cut-over median | total median | bytes sent / dirty bound (max) |")
print("|---|---|---|---|---|---|---|")
names = {"shared": "(a) plain QEMU, shared export", "first-io": "(b) rbdsync first-io", "manual": "(c) rbdsync manual",
         "shared-pause": "(a') plain QEMU, shared export, pause-before-switchover (no storage step)"}
for mode in ["shared", "first-io", "shared-pause", "manual"]:
    rs = by.get(mode, [])
    if not rs:
        continue
    vis = [r[2] for r in rs]
    ratio = max((r[4] / r[5] for r in rs if r[5]), default=0)
    print(f"| {names[mode]} | {statistics.median(vis):.0f} / {max(vis)} ms | {statistics.median(vis) - floor:+.0f} ms | "
          f"{statistics.median(r[0] for r in rs):.0f} ms | {statistics.median(r[1] for r in rs):.0f} ms | "
          f"{statistics.median(r[3] for r in rs) / 1000:.1f} s | {ratio:.2f}x |" if not mode.startswith("shared") else
          f"| {names[mode]} | {statistics.median(vis):.0f} / {max(vis)} ms | {statistics.median(vis) - floor:+.0f} ms | {statistics.median(r[0] for r in rs):.0f} ms | - | "
          f"{statistics.median(r[3] for r in rs) / 1000:.1f} s | - |")
PY
rm -f "$raw"
