#!/usr/bin/env bash
# Many disks per host: one agent serving $DISKS `file:` disks (one VM file each, $SIZE sparse
# images on /dev/shm, $BITMAPS bitmaps per disk), next to the same agent serving one such disk.
#
# Measured per round, for both agents (the one-disk agent is the baseline):
#   start-up  launch to READY=1 on a NOTIFY_SOCKET this script listens on (every disk open, every
#             bitmap loaded, every listener bound)
#   reload    SIGHUP to the next READY=1 (every VM file read again; nothing changed)
#   idle CPU  user+system time of the agent over $IDLE s with no client, in % of one core
#   RSS       VmRSS once idle; per idle disk = (RSS of the big agent - RSS of the baseline) / (DISKS - 1)
#   4K IO     fio 4K random read/write (50/50, iodepth 16, $RUNTIME s, nbd engine) on disk 0 while
#             the other disks are idle; reported as IOPS and as the ratio to the baseline agent
# Goals (issue 19): start-up and reload under 2 s, idle CPU under 1 % of one core, RSS under
# 2 MiB per idle disk, 4K IO on one disk unaffected by the idle others (ratio about 1.0).
#
# Usage: tests/bench/scale.sh     (final numbers: flock /tmp/rbdsync-bench.lock tests/bench/scale.sh)
# Environment:
#   ROUNDS=3  DISKS=100  BITMAPS=4  SIZE=1GiB  IDLE=20  RUNTIME=10
#   RBDSYNC_BIN=...  binary (default target/release/rbdsync, built if missing)
#   OUT=...          report (default tests/bench/results/scale-YYYY-MM-DD.md)
# Needs: python3, fio with the nbd engine. Takes about (20 + IDLE + RUNTIME) x 2 s per round.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
DISKS=${DISKS:-100}
BITMAPS=${BITMAPS:-4}
SIZE=${SIZE:-1GiB}
IDLE=${IDLE:-20}
RUNTIME=${RUNTIME:-10}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RBDSYNC_BIN=${RBDSYNC_BIN:-$REPO_DIR/target/release/rbdsync}
OUT=${OUT:-$SCRIPT_DIR/results/scale-$(date +%Y-%m-%d).md}
SHM=""
AGENT_PID=""
NOTIFY_PID=""

die() {
    echo "scale.sh: error: $*" >&2
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

cleanup() {
    stop_pid "$AGENT_PID" agent
    stop_pid "$NOTIFY_PID" "notify listener"
    [[ -n $SHM ]] && rm -rf "$SHM"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need python3
need fio
SIZE_B=$(bytes "$SIZE" SIZE)
if [[ ! -x $RBDSYNC_BIN ]]; then
    (cd "$REPO_DIR" && cargo build --release -p agent) || die "cannot build rbdsync"
fi
SHM=$(mktemp -d /dev/shm/scale-bench.XXXXXX)
mkdir -p "$(dirname "$OUT")"

# setup N: an agent directory with N VM files (vmI/disk0), each with $BITMAPS bitmaps.
setup() {
    local n=$1 dir=$SHM/agent$1 i b bitmaps=""
    rm -rf "$dir"
    mkdir -p "$dir/vms.d" "$dir/state" "$dir/images"
    for ((b = 0; b < BITMAPS; b++)); do
        bitmaps+="${bitmaps:+, }{name: b$b, granularity: 64KiB}"
    done
    agent_yaml "$dir" >"$dir/agent.yaml"
    for ((i = 0; i < n; i++)); do
        printf 'name: vm%d\ndisks:\n  - name: disk0\n    image: file:%s/images/vm%d.raw\n    size: %d\n    bitmaps: [%s]\n' \
            "$i" "$dir" "$i" "$SIZE_B" "$bitmaps" >"$dir/vms.d/vm$i.yaml"
    done
}

# A listener on a datagram socket that appends "TIME_NS MESSAGE" per notification.
start_notify() {
    rm -f "$SHM/notify.sock" "$SHM/notify.log"
    python3 - "$SHM/notify.sock" "$SHM/notify.log" <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        msg = s.recv(65536).decode(errors="replace").replace("\n", " ")
        log.write("%d %s\n" % (time.time_ns(), msg))
EOF
    NOTIFY_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $SHM/notify.sock ]] && return 0
        sleep 0.05
    done
    die "notify listener did not start"
}

# ready_count: READY=1 lines so far.
ready_count() {
    grep -c "READY=1" "$SHM/notify.log" 2>/dev/null || true
}

# wait_ready N T0_NS: waits for the Nth READY=1, prints its time minus T0 in seconds.
wait_ready() {
    local n=$1 t0=$2 i
    for ((i = 0; i < 1200; i++)); do
        if (($(ready_count) >= n)); then
            grep "READY=1" "$SHM/notify.log" | sed -n "${n}p" |
                awk -v t0="$t0" '{printf "%.3f", ($1 - t0) / 1e9}'
            return 0
        fi
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited: $(tail -n 5 "$SHM/agent.log")"
        sleep 0.01
    done
    die "no READY=1 within 12 s"
}

rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$AGENT_PID/status"
}

# measure N: one agent with N disks; prints "startup reload idle_pct rss_kib iops".
measure() {
    local n=$1 dir=$SHM/agent$1 t0 startup reload ticks0 ticks1 idle rss iops
    : >"$SHM/notify.log"
    rm -f "$dir/nbd.sock" "$dir/control.sock" "$dir/state/agent.json"
    t0=$(date +%s%N)
    NOTIFY_SOCKET=$SHM/notify.sock "$RBDSYNC_BIN" agent --config "$dir/agent.yaml" >>"$SHM/agent.log" 2>&1 &
    AGENT_PID=$!
    startup=$(wait_ready 1 "$t0")
    t0=$(date +%s%N)
    kill -HUP "$AGENT_PID"
    reload=$(wait_ready 2 "$t0")
    sleep 2
    ticks0=$(proc_ticks "$AGENT_PID")
    sleep "$IDLE"
    ticks1=$(proc_ticks "$AGENT_PID")
    idle=$(awk -v t="$((ticks1 - ticks0))" -v hz="$(getconf CLK_TCK)" -v s="$IDLE" 'BEGIN {printf "%.2f", 100 * t / hz / s}')
    rss=$(rss_kib)
    fio --name=io --ioengine=nbd --uri="nbd+unix:///vm0/disk0?socket=$dir/nbd.sock" --rw=randrw --bs=4k \
        --iodepth=16 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
        --output-format=json --output="$SHM/fio.json" >"$SHM/fio.out" 2>&1 || die "fio failed: $(tail -n 3 "$SHM/fio.out")"
    iops=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]))' "$SHM/fio.json")
    stop_pid "$AGENT_PID" agent
    AGENT_PID=""
    echo "$startup $reload $idle $rss $iops"
}

start_notify
setup 1
setup "$DISKS"
results=()
for ((round = 1; round <= ROUNDS; round++)); do
    for n in $( ((round % 2)) && echo "1 $DISKS" || echo "$DISKS 1"); do
        r=$(measure "$n")
        log "round $round, $n disk(s): start-up, reload (s), idle CPU (%), RSS (KiB), 4K IOPS: $r"
        results+=("$n $r")
    done
done

python3 - "$DISKS" "$BITMAPS" "$SIZE" "$ROUNDS" "$OUT" "${results[@]}" <<'EOF' | tee "$OUT"
import statistics, sys, datetime
disks, bitmaps, size, rounds, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
rows = {}
for line in sys.argv[6:]:
    n, *v = line.split()
    rows.setdefault(int(n), []).append([float(x) for x in v])
med = {n: [statistics.median(col) for col in zip(*vals)] for n, vals in rows.items()}
one, many = med[1], med[disks]
per_disk = (many[3] - one[3]) / (disks - 1) / 1024
print(f"# scale.sh {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}\n")
print(f"{disks} file: disks x {bitmaps} bitmaps ({size} sparse each) on one agent vs one disk; ROUNDS={rounds}, medians.\n")
print("| | 1 disk | %d disks | goal |" % disks)
print("|---|---|---|---|")
print(f"| start-up (launch to READY=1) | {one[0]:.2f} s | {many[0]:.2f} s | < 2 s |")
print(f"| reload (SIGHUP to READY=1) | {one[1]:.2f} s | {many[1]:.2f} s | < 2 s |")
print(f"| idle CPU | {one[2]:.2f} % | {many[2]:.2f} % | < 1 % of a core |")
print(f"| RSS | {one[3] / 1024:.1f} MiB | {many[3] / 1024:.1f} MiB ({per_disk:.2f} MiB per extra disk) | < 2 MiB per idle disk |")
print(f"| 4K random r/w on one disk | {one[4]:.0f} IOPS | {many[4]:.0f} IOPS ({many[4] / one[4]:.2f}x) | about 1.0x |")
EOF
