#!/usr/bin/env bash
# Verify benchmark: `rbdsync verify` of a served disk against a sparse copy of it, next to
# `qemu-img compare` of the same two files, in the same round (alternating which runs first).
#
# For each amount of data D in $DATA: a $SIZE raw file on /dev/shm gets D of random data in
# 64 KiB pieces at random 64 KiB-aligned offsets (the rest stays holes); `cp --sparse=always`
# makes the copy. The agent serves the first file as bench/disk0; each round times
#   rbdsync  `rbdsync verify bench/disk0 --against file:COPY --wait --json` (wall time of the
#            command, which returns when the job concluded; summary.bytes_read is recorded)
#   qemu-img `qemu-img compare -f raw -F raw DISK COPY` (both read the files directly; the agent's
#            disk is idle)
# and reports medians and the ratio qemu-img time / rbdsync time (>= 1.0: rbdsync is as fast).
#
# Usage: tests/bench/verify.sh      (final numbers: flock /tmp/rbdsync-bench.lock tests/bench/verify.sh)
# Environment:
#   ROUNDS=5            rounds per amount of data
#   SIZE=1GiB           disk size
#   DATA="128KiB 256MiB"  amounts of data on the disk (multiples of 64 KiB)
#   RBDSYNC_BIN=...     binary (default target/release/rbdsync, built if missing)
#   OUT=...             report (default tests/bench/results/verify-YYYY-MM-DD.md)
# Needs: qemu-img (qemu-utils), python3. Takes under a minute.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-5}
SIZE=${SIZE:-1GiB}
DATA=${DATA:-"128KiB 256MiB"}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RBDSYNC_BIN=${RBDSYNC_BIN:-$REPO_DIR/target/release/rbdsync}
OUT=${OUT:-$SCRIPT_DIR/results/verify-$(date +%Y-%m-%d).md}
SHM=""
AGENT_PID=""

die() {
    echo "verify.sh: error: $*" >&2
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

cleanup() {
    stop_pid "$AGENT_PID" agent
    [[ -n $SHM ]] && rm -rf "$SHM"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need qemu-img qemu-utils
need python3
SIZE_B=$(bytes "$SIZE" SIZE)
if [[ ! -x $RBDSYNC_BIN ]]; then
    (cd "$REPO_DIR" && cargo build --release -p agent) || die "cannot build rbdsync"
fi
SHM=$(mktemp -d /dev/shm/verify-bench.XXXXXX)
mkdir -p "$SHM/vms.d" "$SHM/state" "$(dirname "$OUT")"

# fill FILE BYTES SEED: BYTES of random data in 64 KiB pieces at distinct random offsets.
fill() {
    python3 - "$1" "$SIZE_B" "$2" "$3" <<'EOF'
import os, random, sys
path, size, data, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
piece = 64 << 10
rnd = random.Random(seed)
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
for slot in rnd.sample(range(size // piece), data // piece):
    os.pwrite(fd, rnd.randbytes(piece), slot * piece)
os.fsync(fd)
os.close(fd)
EOF
}

start_agent() {
    agent_yaml "$SHM" >"$SHM/agent.yaml"
    cat >"$SHM/vms.d/bench.yaml" <<EOF
name: bench
disks:
  - name: disk0
    image: file:$SHM/disk.raw
    size: $SIZE_B
EOF
    rm -f "$SHM/control.sock" "$SHM/state/agent.json"
    "$RBDSYNC_BIN" agent --config "$SHM/agent.yaml" >>"$SHM/agent.log" 2>&1 &
    AGENT_PID=$!
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -s $SHM/state/agent.json && -S $SHM/control.sock ]] && return 0
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited: $(tail -n 5 "$SHM/agent.log")"
        sleep 0.05
    done
    die "agent not ready within 30 s"
}

# elapsed COMMAND...: runs it, prints its wall time in seconds (stdout of the command to $SHM/out).
elapsed() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >"$SHM/out" 2>"$SHM/err" || [[ $1 == qemu-img && $? == 1 ]] || die "$* failed: $(cat "$SHM/err")"
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f", (b - a) / 1e9}'
}

rows=()
for data in $DATA; do
    data_b=$(bytes "$data" DATA)
    stop_pid "$AGENT_PID" agent
    AGENT_PID=""
    log "disk of $SIZE with $data of data"
    fill "$SHM/disk.raw" "$data_b" 7
    rm -f "$SHM/copy.raw"
    cp --sparse=always "$SHM/disk.raw" "$SHM/copy.raw"
    start_agent
    ours=() theirs=() read_b=""
    for ((round = 1; round <= ROUNDS; round++)); do
        for who in $( ((round % 2)) && echo "ours theirs" || echo "theirs ours"); do
            if [[ $who == ours ]]; then
                ours+=("$(elapsed "$RBDSYNC_BIN" --control "unix:$SHM/control.sock" --json verify bench/disk0 \
                    --against "file:$SHM/copy.raw" --wait)")
                read_b=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); assert j["result"]=="success", j; print(j["summary"]["bytes_read"])' "$SHM/out")
            else
                theirs+=("$(elapsed qemu-img compare -f raw -F raw "$SHM/disk.raw" "$SHM/copy.raw")")
                grep -q "Images are identical" "$SHM/out" || die "qemu-img compare: $(cat "$SHM/out")"
            fi
        done
        log "round $round: rbdsync ${ours[-1]} s, qemu-img compare ${theirs[-1]} s"
    done
    rows+=("$(python3 - "$data" "$read_b" "${ours[*]}" "${theirs[*]}" <<'EOF'
import statistics, sys
data, read_b = sys.argv[1], int(sys.argv[2])
ours = [float(x) for x in sys.argv[3].split()]
theirs = [float(x) for x in sys.argv[4].split()]
o, t = statistics.median(ours), statistics.median(theirs)
print(f"| {data} | {o * 1000:.0f} ms | {t * 1000:.0f} ms | {t / o:.2f}x | {read_b / 2**20:.2f} MiB |")
EOF
)")
done

{
    echo "# verify.sh $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "$SIZE disk, ROUNDS=$ROUNDS, medians; ratio = qemu-img compare time / rbdsync verify time."
    echo
    echo "| data on the disk | rbdsync verify | qemu-img compare | ratio | rbdsync read (both sides) |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT"
