#!/usr/bin/env bash
# Backup benchmark: full and incremental backups of a $SIZE (2 GiB) disk to RBD, on a throw-away
# Ceph cluster (deploy/dev/ceph-cluster.sh: one mon + one memstore OSD on 127.0.0.1; a fresh one
# per round, with a fresh agent process), against `rbd bench` on the same cluster in the same round.
#
# The disk is a `file:` image on tmpfs ($SIZE, every byte written with fio's random buffers
# before the agent starts, so a full backup copies real data), with one bitmap (`backup`,
# $GRANULARITY). Each round, in this order (the rbd bench references run before the backups in
# odd rounds and after them in even rounds):
#   rbd bench    `rbd bench --io-type write --io-size 4M --io-total $SIZE --io-threads N` on a
#                fresh image, for each N in $RBD_BENCH_THREADS (the first N is the reference)
#   full         `rbdsync backup bench/disk0 --sync full --bitmap backup --target rbd:POOL/IMG
#                --wait --json` to a fresh image; throughput = $SIZE / wall time of that command
#   incremental  for each P in $DIRTY: fio writes P% of the disk ($DIRTY_BS random writes, no
#                offset twice, through the agent's NBD export), then `--sync incremental`
#   client       fio 4K randwrite, iodepth $CLIENT_QD, time-based ($RUNTIME s) against the NBD
#                export with the agent idle ("before"), then again right after starting a full
#                backup (no --speed) to a fresh image ("during")
# Reported per backup: bytes the client dirtied, the same rounded up to the bitmap granularity
# (from fio's own write log), the bitmap's dirty_bytes before the backup, the job's
# bytes_total/bytes_done, bytes read by the agent (its rchar from /proc/PID/io over the backup:
# pread()s of the disk file plus a few KiB of librados replies), bytes written (the job's
# summary.bytes_written, cross-checked with the rbdsync_backup_last_written_bytes metric) and the
# bytes that changed on the target (`rbd diff [--from-snap PREV] IMG@SNAP`, summed).
# Goals (from the backup issue): full backup >= 0.9x rbd bench; incremental writes <= dirty
# bytes rounded up to the granularity; client 4K randwrite IOPS during a full backup >= 0.8x
# before. The table (medians over the rounds) is printed and written to
# tests/bench/results/backup-DATE.md (raw numbers in backup-DATE.csv beside it).
#
# Usage: tests/bench/backup.sh     (final numbers: flock /tmp/rbdsync-bench.lock tests/bench/backup.sh)
# Environment:
#   ROUNDS=3                rounds
#   SIZE=2GiB               disk size (a multiple of 4 MiB; the disk lives on /dev/shm)
#   GRANULARITY=64KiB       bitmap granularity
#   DIRTY="1 10"            incremental backups: percent of the disk dirtied before each
#   DIRTY_BS=64KiB          size of the random writes that dirty it (aligned to their size)
#   RBD_BENCH_THREADS="16 4"  rbd bench --io-threads values (the first is the reference; the
#                           backup job itself keeps 4 x 4 MiB writes in flight)
#   RUNTIME=6               seconds per client fio run; the first RAMP=1 s is not counted
#   CLIENT_QD=16            client fio iodepth
#   POOL=backup             pool for the backup targets and rbd bench images
#   CEPH_CONF=...           use this running cluster instead of starting one (only the script's
#                           images are touched)
#   CEPH_MEMSTORE_BYTES     passed to ceph-cluster.sh (its default: 8 GiB, a cap)
#   RBDSYNC_BIN=...         binary (default target/release/rbdsync, built if missing, not if stale)
#   OUT=...                 report path (default tests/bench/results/backup-YYYY-MM-DD.md)
#   KEEP=1                  keep the work directories (logs, JSON, fio output; not the disk)
# Needs: ceph (mon, osd, rbd CLI), fio with the nbd engine, python3, ss (iproute2).
# Memory: the disk (+ up to $SIZE of copy-before-write scratch) on /dev/shm, and the OSD grows to
# ~6-7 GiB per round (memstore). Default run: ~10 s of setup, then ~40-70 s per round: 2-4 minutes.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-2GiB}
GRANULARITY=${GRANULARITY:-64KiB}
DIRTY=${DIRTY:-"1 10"}
DIRTY_BS=${DIRTY_BS:-64KiB}
RBD_BENCH_THREADS=${RBD_BENCH_THREADS:-"16 4"}
RUNTIME=${RUNTIME:-6}
RAMP=1
CLIENT_QD=${CLIENT_QD:-16}
POOL=${POOL:-backup}
KEEP=${KEEP:-0}
DISK=bench/disk0
BITMAP=backup

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
DEFAULT_BIN="$REPO_DIR/target/release/rbdsync"
RBDSYNC_BIN=${RBDSYNC_BIN:-${RBDSYNC:-$DEFAULT_BIN}}
CLUSTER_SH="$REPO_DIR/deploy/dev/ceph-cluster.sh"
DATE=$(date +%Y-%m-%d)
OUT=${OUT:-$RESULTS_DIR/backup-$DATE.md}

WORK=""          # /tmp/backup-bench.XXXXXX: logs, outputs, the cluster
SHM=""           # /dev/shm/backup-bench.XXXXXX: disk image, agent state (bitmaps, scratch)
CEPH_DIR=""      # the cluster this script started and must stop (one per round)
EXTERNAL_CONF=${CEPH_CONF:-}
CONF=$EXTERNAL_CONF
AGENT_BIN=""     # copy of $RBDSYNC_BIN whose name does not hold "rbdsync" (another test's pkill -f)
AGENT_PID=""
WAITER_PID=""    # background `job wait` during the client part
METRICS=""       # host:port of the agent's metrics
IMAGES=()        # images this script created that may still exist (removed on exit)
ORIG_CMDLINE="$0${*:+ $*}"

die() {
    if [[ -z $WORK || (-d $WORK && ! -e $WORK/interrupted) ]]; then
        echo "backup.sh: error: $*" >&2
    fi
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

rbd_() {
    timeout 120 rbd -c "$CONF" "$@"
}

cli() {
    timeout 600 "$AGENT_BIN" --control "unix:$SHM/control.sock" "$@"
}

now_ns() {
    date +%s%N
}

load1() {
    cut -d' ' -f1 /proc/loadavg
}

# --- cleanup (stop_pid: lib.sh) ------------------------------------------------------------

remove_image() {
    local image=$1 keep=() i
    rbd_ snap purge --no-progress "$POOL/$image" >/dev/null 2>&1 || true
    rbd_ rm --no-progress "$POOL/$image" >/dev/null 2>&1 ||
        echo "backup.sh: could not remove image $POOL/$image" >&2
    for i in "${IMAGES[@]}"; do
        [[ $i == "$image" ]] || keep+=("$i")
    done
    IMAGES=("${keep[@]}")
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -gt 128 && -n $WORK && -d $WORK ]]; then
        : >"$WORK/interrupted"
    fi
    stop_pid "$WAITER_PID" "job waiter"
    WAITER_PID=""
    stop_pid "$AGENT_PID" agent
    AGENT_PID=""
    # An existing cluster keeps running: remove what we created. Ours goes away as a whole.
    if [[ -n $EXTERNAL_CONF ]]; then
        local image
        for image in "${IMAGES[@]}"; do
            remove_image "$image"
        done
    fi
    stop_cluster
    [[ -z $SHM || ! -d $SHM ]] || rm -rf "$SHM"
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            rm -f "$WORK/agent-under-test"
            echo "backup.sh: work directory kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# --- checks and setup ----------------------------------------------------------------------



check_params() {
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
    [[ $CLIENT_QD =~ ^[1-9][0-9]*$ ]] || die "CLIENT_QD must be a positive integer (got '$CLIENT_QD')"
    if ! [[ $RUNTIME =~ ^[0-9]+$ ]] || ((RUNTIME < RAMP + 2)); then
        die "RUNTIME must be at least $((RAMP + 2)) (seconds)"
    fi
    SIZE_B=$(bytes "$SIZE" SIZE)
    GRAN_B=$(bytes "$GRANULARITY" GRANULARITY)
    DIRTY_BS_B=$(bytes "$DIRTY_BS" DIRTY_BS)
    ((SIZE_B >= 64 << 20 && SIZE_B % (4 << 20) == 0)) || die "SIZE must be a multiple of 4 MiB, at least 64 MiB"
    ((GRAN_B >= 4096 && (GRAN_B & (GRAN_B - 1)) == 0)) || die "GRANULARITY must be a power of two >= 4KiB"
    ((DIRTY_BS_B >= 4096 && DIRTY_BS_B % 4096 == 0 && SIZE_B % DIRTY_BS_B == 0)) ||
        die "DIRTY_BS must be a multiple of 4KiB that divides SIZE"
    local p
    for p in $DIRTY; do
        if ! [[ $p =~ ^[0-9]+(\.[0-9]+)?$ ]] || ! awk -v p="$p" 'BEGIN {exit !(p > 0 && p <= 100)}'; then
            die "DIRTY: '$p' is not a percentage in (0, 100]"
        fi
    done
    for p in $RBD_BENCH_THREADS; do
        [[ $p =~ ^[1-9][0-9]*$ ]] || die "RBD_BENCH_THREADS: '$p' is not a positive integer"
    done
    [[ -n ${RBD_BENCH_THREADS// /} ]] || die "RBD_BENCH_THREADS is empty"
}

check_tools() {
    need rbd ceph-common
    need fio fio
    need python3 python3
    need timeout coreutils
    need ceph ceph-common
    need ss iproute2
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd failed)"
    if [[ -z $CONF ]]; then
        need ceph-mon ceph-mon
        need ceph-osd ceph-osd
        [[ -x $CLUSTER_SH ]] || die "$CLUSTER_SH missing"
    fi
    # The disk and the OSD's memstore both live in RAM.
    local avail
    avail=$(df -B1 --output=avail /dev/shm | tail -n 1)
    ((avail > SIZE_B + (256 << 20))) || die "/dev/shm has $((avail >> 20)) MiB free; the disk needs $((SIZE_B >> 20)) MiB"
}

ensure_built() {
    if [[ ! -x $RBDSYNC_BIN ]]; then
        [[ $RBDSYNC_BIN == "$DEFAULT_BIN" ]] || die "$RBDSYNC_BIN is not an executable file"
        need cargo cargo
        log "building: cargo build --release -p agent"
        (cd "$REPO_DIR" && cargo build --release -p agent) >&2
        [[ -x $RBDSYNC_BIN ]] || die "cargo build did not produce $RBDSYNC_BIN"
    fi
}

# start_cluster ROUND: a fresh throw-away cluster per round (or the existing one). memstore keeps
# everything in RAM and frees the clones of removed snapshots only as the OSD trims them (slowly:
# memstore reports itself rotational, so osd_snap_trim_sleep_hdd = 5 s applies); one cluster for
# all rounds filled the 8 GiB memstore in round 2, and once reported a bogus "-2147483648% full".
start_cluster() {
    if [[ -n $EXTERNAL_CONF ]]; then
        [[ -r $CONF ]] || die "CEPH_CONF=$CONF is not readable"
        log "using the running cluster of $CONF"
    else
        CEPH_DIR="$WORK/ceph-r$1"
        log "starting a throw-away cluster in $CEPH_DIR"
        "$CLUSTER_SH" up "$CEPH_DIR" >"$WORK/ceph-up-r$1.log" 2>&1 ||
            die "ceph-cluster.sh up failed: $(tail -n 20 "$WORK/ceph-up-r$1.log")"
        CONF="$CEPH_DIR/ceph.conf"
    fi
    rbd_ ls "$POOL" >/dev/null || die "'rbd -c $CONF ls $POOL' failed (pool $POOL missing?)"
}

stop_cluster() {
    [[ -n $CEPH_DIR ]] || return 0
    "$CLUSTER_SH" down "$CEPH_DIR" >/dev/null 2>&1 || echo "backup.sh: stopping the cluster in $CEPH_DIR failed" >&2
    CEPH_DIR=""
}

ceph_() {
    timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"
}

# wait_space: waits (up to 5 minutes) while the cluster reports a full or nearfull OSD or pool
# (memstore: removed images and snapshots are freed asynchronously).
wait_space() {
    local i checks
    for ((i = 0; i < 300; i++)); do
        checks=$(ceph_ health --format json 2>/dev/null |
            python3 -c 'import json, sys; print(" ".join(k for k in json.load(sys.stdin).get("checks", {}) if "FULL" in k))' 2>/dev/null) ||
            checks=""
        [[ -n $checks ]] || break
        ((i % 10 == 0)) && log "waiting for the cluster to free space ($checks); OSD resident memory $(osd_rss) MiB"
        sleep 1
    done
    [[ -z $checks ]] || die "the cluster still reports $checks after 5 minutes"
    if ((i > 0)); then
        log "waited $i s for the cluster to free space"
    fi
}

osd_rss() {
    local pid
    pid=$(cat "$CEPH_DIR/run/osd.0.pid" 2>/dev/null) || { echo "?"; return; }
    awk '$1 == "VmRSS:" {printf "%d", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "?"
}

# The disk: $SIZE on tmpfs, every byte written (fio's random buffers), before the agent sees it.
make_disk() {
    log "writing $SIZE of random data to the disk image"
    fio --name=fill --filename="$SHM/images/disk0.raw" --ioengine=psync --rw=write --bs=4M \
        --size="$SIZE_B" --end_fsync=0 --output="$WORK/out/fill.txt" >/dev/null 2>&1 ||
        die "fio could not fill the disk: $(tail -n 5 "$WORK/out/fill.txt")"
    [[ $(stat -c %s "$SHM/images/disk0.raw") == "$SIZE_B" ]] || die "the disk image has the wrong size"
}

start_agent() {
    local i
    mkdir -p "$SHM/vms.d" "$SHM/state"
    {
        agent_yaml "$SHM"
        printf 'metrics:\n  listen: "127.0.0.1:0"\nceph:\n  conf: %s\n  client: admin\n' "$CONF"
    } >"$SHM/agent.yaml"
    cat >"$SHM/vms.d/bench.yaml" <<EOF
name: bench
disks:
  - name: disk0
    image: file:$SHM/images/disk0.raw
    size: $SIZE_B
    bitmaps: [{name: $BITMAP, granularity: $GRAN_B}]
EOF
    rm -f "$SHM/nbd.sock" "$SHM/control.sock" "$SHM/state/agent.json"
    "$AGENT_BIN" agent --config "$SHM/agent.yaml" >>"$WORK/agent.log" 2>&1 &
    AGENT_PID=$!
    for ((i = 0; i < 600; i++)); do
        [[ -s $SHM/state/agent.json && -S $SHM/nbd.sock && -S $SHM/control.sock ]] && break
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited during startup: $(tail -n 5 "$WORK/agent.log")"
        sleep 0.05
    done
    [[ -s $SHM/state/agent.json && -S $SHM/nbd.sock ]] || die "agent not serving within 30 s; see $WORK/agent.log"
    URI="nbd+unix:///$DISK?socket=$SHM/nbd.sock"
    # metrics.listen is 127.0.0.1:0; find the port the agent bound (its only TCP listener).
    METRICS=$(ss -Hltnp 2>/dev/null | awk -v p="pid=$AGENT_PID," 'index($0, p) {print $4; exit}')
    [[ -n $METRICS ]] || log "warning: could not find the agent's metrics port; the metric cross-check is skipped"
}

# metric NAME: value of the agent's metric NAME{disk="bench/disk0"} (empty if unavailable).
metric() {
    [[ -n $METRICS ]] || return 0
    curl -s --max-time 5 "http://$METRICS/metrics" 2>/dev/null |
        awk -v m="$1{disk=\"$DISK\"}" '$1 == m {print $2; exit}' || true
}

agent_rchar() {
    awk '$1 == "rchar:" {print $2}' "/proc/$AGENT_PID/io" 2>/dev/null || die "agent (pid $AGENT_PID) is gone"
}

# jq-like: pyget FILE EXPR prints EXPR evaluated on the JSON in FILE (as `j`).
pyget() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])
v = eval(sys.argv[2], {"j": j})
print("" if v is None else v)
EOF
}

bitmap_dirty() {
    cli --json bitmap list "$DISK" >"$WORK/out/bitmaps.json" || die "bitmap list failed"
    python3 - "$WORK/out/bitmaps.json" "$BITMAP" <<'EOF'
import json, sys
for b in json.load(open(sys.argv[1])):
    if b["name"] == sys.argv[2]:
        print(b["dirty_bytes"])
        break
else:
    sys.exit("bitmap not listed")
EOF
}

# diff_bytes IMAGE SNAP [FROM]: bytes that differ between FROM (or nothing) and IMAGE@SNAP.
diff_bytes() {
    local args=()
    [[ -z ${3:-} ]] || args=(--from-snap "$3")
    rbd_ diff "${args[@]}" --format json "$POOL/$1@$2" >"$WORK/out/diff.json" || die "rbd diff $POOL/$1@$2 failed"
    python3 -c 'import json, sys; print(sum(e["length"] for e in json.load(open(sys.argv[1]))))' "$WORK/out/diff.json"
}

# --- the measurements ----------------------------------------------------------------------

CSV=""
record() { # record ROUND KEY VALUE
    echo "$1,$2,$3" >>"$CSV"
}

# rbd_bench ROUND THREADS: fresh image, rbd bench, image removed; records MiB/s.
rbd_bench() {
    local round=$1 threads=$2 image="bench-$$-r$1-rbdbench$2" out="$WORK/out/r$1-rbdbench$2"
    wait_space
    rbd_ create --size "$((SIZE_B >> 20))M" "$POOL/$image" >/dev/null || die "rbd create $POOL/$image failed"
    IMAGES+=("$image")
    local t0 t1
    t0=$(now_ns)
    timeout 600 rbd -c "$CONF" bench --io-type write --io-size 4M --io-threads "$threads" --io-total "$SIZE_B" \
        --io-pattern seq "$POOL/$image" >"$out" 2>&1 || die "rbd bench failed: $(tail -n 5 "$out")"
    t1=$(now_ns)
    remove_image "$image"
    local mibs wall
    mibs=$(python3 - "$out" <<'EOF'
import re, sys
m = re.search(r"elapsed:\s*\S+\s+ops:\s*(\d+)\s+ops/sec:\s*([0-9.]+)", open(sys.argv[1]).read())
if not m:
    sys.exit(f"no summary line in {sys.argv[1]}")
print(f"{float(m.group(2)) * 4:.1f}")
EOF
    ) || die "cannot parse $out"
    wall=$(awk -v a="$t0" -v b="$t1" -v s="$SIZE_B" 'BEGIN {printf "%.1f", s / 1048576 / ((b - a) / 1e9)}')
    record "$round" "rbdbench$threads.mibs" "$mibs"
    record "$round" "rbdbench$threads.wall_mibs" "$wall"
    log "round $round: rbd bench --io-threads $threads: $mibs MiB/s ($wall MiB/s including start and open), load $(load1)"
}

# backup ROUND NAME SYNC IMAGE [PREV_SNAP]: runs a backup with --wait and records its numbers.
# Sets SNAP to the snapshot it made.
backup() {
    local round=$1 name=$2 sync=$3 image=$4 prev=${5:-} out="$WORK/out/r$1-$2.json"
    local t0 t1 r0 r1
    r0=$(agent_rchar)
    t0=$(now_ns)
    if ! cli --json backup "$DISK" --sync "$sync" --bitmap "$BITMAP" --target "rbd:$POOL/$image" --wait >"$out" 2>"$out.err"; then
        die "backup $name failed: $(tail -n 3 "$out.err") $(head -c 2000 "$out")"
    fi
    t1=$(now_ns)
    r1=$(agent_rchar)
    [[ $(pyget "$out" 'j["result"]') == success ]] || die "backup $name did not succeed: $(head -c 2000 "$out")"
    SNAP=$(pyget "$out" 'j["summary"]["snapshot"]')
    local secs done_ total written scratch diff met
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
    done_=$(pyget "$out" 'j["bytes_done"]')
    total=$(pyget "$out" 'j["bytes_total"]')
    written=$(pyget "$out" 'j["summary"]["bytes_written"]')
    scratch=$(pyget "$out" 'j["summary"]["scratch_bytes"]')
    diff=$(diff_bytes "$image" "$SNAP" "$prev")
    met=$(metric rbdsync_backup_last_written_bytes)
    record "$round" "$name.secs" "$secs"
    record "$round" "$name.bytes_total" "$total"
    record "$round" "$name.bytes_done" "$done_"
    record "$round" "$name.read" "$((r1 - r0))"
    record "$round" "$name.written" "$written"
    record "$round" "$name.metric_written" "${met:-}"
    record "$round" "$name.diff" "$diff"
    record "$round" "$name.scratch" "$scratch"
    record "$round" "$name.load" "$(load1)"
    log "round $round: $name ($sync): $(awk -v s="$secs" -v t="$total" 'BEGIN {printf "%.2f s, %.0f MiB/s of bytes_total", s, t / 1048576 / s}'), total $total, done $done_, read $((r1 - r0)), written $written, rbd diff $diff, metric ${met:-?}, load $(load1)"
}

# dirty ROUND NAME PCT: fio writes PCT% of the disk (DIRTY_BS blocks, each offset once) through
# NBD; records the client's bytes, those rounded up to granules, and the bitmap's dirty bytes.
dirty() {
    local round=$1 name=$2 pct=$3 out="$WORK/out/r$1-$2-fio"
    local n
    n=$(awk -v p="$pct" -v s="$SIZE_B" -v b="$DIRTY_BS_B" 'BEGIN {x = p / 100 * s / b; n = int(x); if (n < x) n++; print n}')
    rm -f "$out.iolog"
    timeout 300 fio --name="$name" --ioengine=nbd --uri="$URI" --rw=randwrite --bs="$DIRTY_BS_B" --iodepth=16 \
        --size="$SIZE_B" --io_size="$((n * DIRTY_BS_B))" --randrepeat=0 --write_iolog="$out.iolog" \
        --output-format=json --output="$out.json" >"$out.stdout" 2>&1 ||
        die "fio (dirty $pct%) failed: $(tail -n 5 "$out.stdout")"
    local client rounded
    read -r client rounded < <(python3 - "$out.iolog" "$GRAN_B" <<'EOF'
import sys
gran = int(sys.argv[2])
client, granules = 0, set()
for line in open(sys.argv[1]):
    f = line.split()  # v2: "FILE write OFF LEN"; v3: "TIME_MS FILE write OFF LEN"
    if len(f) in (4, 5) and f[-3] == "write":
        off, length = int(f[-2]), int(f[-1])
        client += length
        granules.update(range(off // gran, (off + length - 1) // gran + 1))
print(client, len(granules) * gran)
EOF
    ) || die "cannot read fio's write log $out.iolog"
    ((client == n * DIRTY_BS_B)) || die "fio wrote $client bytes, expected $((n * DIRTY_BS_B)) (see $out.iolog)"
    local bm
    bm=$(bitmap_dirty)
    record "$round" "$name.client" "$client"
    record "$round" "$name.rounded" "$rounded"
    record "$round" "$name.bitmap" "$bm"
    log "round $round: dirtied $pct% of the disk: $n x $DIRTY_BS_B B = $client B by the client, $rounded B in granules, bitmap dirty_bytes $bm"
}

# client_fio OUT: time-based 4K randwrite; prints nothing, leaves OUT.json and OUT_iops.1.log.
client_fio() {
    local out=$1
    rm -f "${out}"_iops.*.log
    timeout $((RUNTIME + 120)) fio --name=client --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4096 \
        --iodepth="$CLIENT_QD" --size="$SIZE_B" --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 \
        --write_iops_log="$out" --log_avg_msec=250 --log_unix_epoch=1 --output-format=json --output="$out.json" >"$out.stdout" 2>&1 ||
        die "client fio failed: $(tail -n 5 "$out.stdout")"
}

# window_iops LOG END_MS: mean IOPS of fio's 250 ms samples (Unix-epoch stamps, each at the end
# of its interval) from RAMP s after fio's start to the end of the run or END_MS (epoch ms; 0:
# none), whichever is first. Prints "IOPS SECONDS_COVERED" ("- SECONDS" if under 0.5 s).
window_iops() {
    python3 - "$1" "$2" "$RAMP" "$RUNTIME" <<'PY'
import sys
end, ramp, runtime = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
samples = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    if len(f) >= 2 and f[0]:
        samples.append((int(f[0]), float(f[1])))
if not samples:
    sys.exit(f"no IOPS samples in {sys.argv[1]}")
start = samples[0][0] - 250
lo, hi = start + ramp * 1000, start + runtime * 1000
if end > 0:
    hi = min(hi, end)
sel = [v for t, v in samples if lo < t <= hi]
covered = max(hi - lo, 0) / 1000
if covered < 0.5 or not sel:
    print(f"- {covered:.2f}")
else:
    print(f"{sum(sel) / len(sel):.0f} {covered:.2f}")
PY
}

# client ROUND: fio before, then fio during a full backup to a fresh image.
client() {
    local round=$1 out="$WORK/out/r$1-client" image="bench-$$-r$1-during"
    local before cover
    client_fio "$out-before"
    read -r before cover < <(window_iops "$out-before_iops.1.log" 0) ||
        die "no IOPS log for the client run before the backup"
    [[ $before != - ]] || die "the client run before the backup gave no IOPS samples"
    record "$round" client.before "$before"
    wait_space
    IMAGES+=("$image")
    local t0 tend
    t0=$(now_ns)
    cli --json backup "$DISK" --sync full --bitmap "$BITMAP" --target "rbd:$POOL/$image" >"$out-started.json" 2>"$out-started.err" ||
        die "starting the backup under load failed: $(cat "$out-started.err")"
    local id
    id=$(pyget "$out-started.json" 'j["id"]')
    (
        rc=0
        cli --json job wait "$id" >"$out-waited.json" 2>"$out-waited.err" || rc=$?
        now_ns >"$out-waited.end"
        echo "$rc" >"$out-waited.rc"
    ) &
    WAITER_PID=$!
    client_fio "$out-during"
    wait "$WAITER_PID" || true
    WAITER_PID=""
    [[ $(cat "$out-waited.rc") == 0 && $(pyget "$out-waited.json" 'j["result"]') == success ]] ||
        die "the backup under load failed: $(cat "$out-waited.err") $(head -c 2000 "$out-waited.json")"
    tend=$(cat "$out-waited.end")
    local during bsecs scratch
    read -r during cover < <(window_iops "$out-during_iops.1.log" $((tend / 1000000))) ||
        die "no IOPS log for the client run during the backup"
    if [[ $during == - ]]; then
        log "round $round: the backup under load ended before fio's first $RAMP s were over: nothing measured (raise SIZE)"
        during=""
    fi
    bsecs=$(awk -v a="$t0" -v b="$tend" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
    scratch=$(pyget "$out-waited.json" 'j["summary"]["scratch_bytes"]')
    record "$round" client.during "$during"
    record "$round" client.window_s "$cover"
    record "$round" client.backup_secs "$bsecs"
    record "$round" client.backup_total "$(pyget "$out-waited.json" 'j["bytes_total"]')"
    record "$round" client.scratch "$scratch"
    record "$round" client.load "$(load1)"
    log "round $round: client 4K randwrite: before $before IOPS, during a full backup ${during:-?} IOPS (over $cover s; backup took $bsecs s under load, scratch $scratch B), load $(load1)"
    remove_image "$image"
}

# backups ROUND: full, then the incrementals, on one fresh image (removed afterwards).
backups() {
    local round=$1 image="bench-$$-r$1-chain" pct prev
    wait_space
    IMAGES+=("$image")
    backup "$round" full full "$image"
    prev=$SNAP
    for pct in $DIRTY; do
        dirty "$round" "inc$pct" "$pct"
        backup "$round" "inc$pct" incremental "$image" "$prev"
        prev=$SNAP
    done
    remove_image "$image"
}

run_round() {
    local round=$1 t
    start_cluster "$round"
    start_agent
    if ((round % 2 == 1)); then
        for t in $RBD_BENCH_THREADS; do rbd_bench "$round" "$t"; done
        backups "$round"
    else
        backups "$round"
        for t in $RBD_BENCH_THREADS; do rbd_bench "$round" "$t"; done
    fi
    client "$round"
    local rss
    rss=$(osd_rss)
    record "$round" osd_rss_mib "$rss"
    log "round $round done; OSD resident memory $rss MiB, /dev/shm free $(($(df -B1 --output=avail /dev/shm | tail -n 1) >> 20)) MiB"
    stop_pid "$AGENT_PID" agent
    AGENT_PID=""
    stop_cluster
}

# --- report --------------------------------------------------------------------------------

header() {
    echo "# Backup benchmark: full and incremental backups to RBD vs rbd bench, client slowdown"
    echo
    echo "- command: \`$ORIG_CMDLINE\` (ROUNDS=$ROUNDS SIZE=$SIZE GRANULARITY=$GRANULARITY DIRTY=\"$DIRTY\" DIRTY_BS=$DIRTY_BS RBD_BENCH_THREADS=\"$RBD_BENCH_THREADS\" RUNTIME=$RUNTIME CLIENT_QD=$CLIENT_QD POOL=$POOL)"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '$1 == "MemTotal:" {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo), load average at start: $LOAD_START"
    echo "- rbdsync: $("$AGENT_BIN" --version 2>/dev/null | head -n1) ($RBDSYNC_BIN, $(date -r "$RBDSYNC_BIN" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$AGENT_BIN" | cut -c1-16); git $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_DIR" status --porcelain -- agent proto 2>/dev/null | grep -q . && echo ', agent/ or proto/ differ from HEAD'))"
    echo "- ceph: $(rbd --version | head -n1); librbd $(dpkg-query -W -f '${Version}' librbd1 2>/dev/null || echo '?')"
    echo "- cluster: $(if [[ -z $EXTERNAL_CONF ]]; then echo "throw-away, a fresh one per round (deploy/dev/ceph-cluster.sh: 1 mon + 1 memstore OSD, size-1 pools, 127.0.0.1) in $WORK/ceph-rN; the agent is restarted with each"; else echo "existing, $CONF"; fi); pool $POOL; images: 4 MiB objects, features from rbd_default_features, fresh per measurement and removed after it"
    echo "- disk: \`file:\` raw image on tmpfs (/dev/shm), $SIZE, fully written with fio's random buffers before the agent starts; bitmap \`$BITMAP\`, granularity $GRANULARITY; agent state (bitmaps, copy-before-write scratch) on tmpfs too"
    echo "- fio: $(fio --version); dirtying: ${DIRTY_BS} random writes, iodepth 16, each offset once (fio's random map), through the NBD export; client: 4K randwrite, iodepth $CLIENT_QD, 1 job, 1 connection (Unix socket), ${RUNTIME} s time-based, IOPS from 250 ms samples after the first ${RAMP} s"
    echo "- each cell: median over $ROUNDS rounds (the rbd bench runs come before the backups in odd rounds, after them in even ones)"
}

report() {
    python3 - "$1" "$SIZE_B" "$GRAN_B" "$DIRTY" "$RBD_BENCH_THREADS" "$DIRTY_BS_B" <<'EOF'
import csv, statistics, sys
from collections import defaultdict
path, size, gran = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dirty, threads, dbs = sys.argv[4].split(), sys.argv[5].split(), int(sys.argv[6])
med = statistics.median
vals = defaultdict(dict)  # key -> round -> float
with open(path) as f:
    for r in csv.reader(f):
        if r[0] == "round" or r[2] == "":
            continue
        vals[r[1]][int(r[0])] = float(r[2])
rounds = sorted({rd for v in vals.values() for rd in v})


def get(k):
    return [vals[k][rd] for rd in rounds if rd in vals[k]]


def m(k):
    v = get(k)
    return med(v) if v else None


def spread(v):
    return (max(v) - min(v)) / med(v) if v and med(v) else 0.0


def mib(b):
    return b / 1048576


def fmt_b(b):
    if b is None:
        return "-"
    return f"{b:,.0f} ({mib(b):,.2f} MiB)" if b >= 1048576 else f"{b:,.0f}"


goals = []
ref = f"rbdbench{threads[0]}.mibs"
full_mibs = {rd: mib(size) / vals["full.secs"][rd] for rd in vals["full.secs"]}
print("## Full backup throughput")
print()
print(f"Full backup of the {mib(size):,.0f} MiB disk: disk size / wall time of `rbdsync backup --sync full --wait` "
      f"(start, freeze, copy, flush, snapshot, bitmap commit). rbd bench: its own ops/sec x 4 MiB "
      f"(IO time only; the `incl. start` column is the same bytes over the whole command).")
print()
print("| what | MiB/s | ratio backup / this | ratio per round | spread | incl. start MiB/s |")
print("|---|---:|---:|---:|---:|---:|")
fm = med(list(full_mibs.values()))
print(f"| rbdsync full backup | {fm:,.0f} | - | - | {spread(list(full_mibs.values())) * 100:.0f}% | - |")
for t in threads:
    k = f"rbdbench{t}.mibs"
    per = [full_mibs[rd] / vals[k][rd] for rd in rounds if rd in vals[k] and rd in full_mibs]
    r = fm / m(k)
    print(f"| rbd bench --io-threads {t} | {m(k):,.0f} | {r:.2f} | {', '.join(f'{x:.2f}' for x in per)} | "
          f"{spread(get(k)) * 100:.0f}% | {m(f'rbdbench{t}.wall_mibs'):,.0f} |")
r_full = fm / m(ref)
goals.append(("full backup >= 0.9x rbd bench (--io-threads %s)" % threads[0], r_full >= 0.9, f"{r_full:.2f}x"))
print()

print("## Bytes read and written vs dirty bytes")
print()
print(f"Medians over the rounds. `dirtied` = bytes the client wrote ({dbs // 1024} KiB random writes, each offset once); "
      f"`rounded` = the granules those writes touched x {gran // 1024} KiB (from fio's write log); `bitmap` = the "
      f"bitmap's dirty_bytes just before the backup; `total`/`done` = the job's bytes_total/bytes_done; `read` = the "
      f"agent's rchar over the backup (pread of the disk + a few KiB of librados replies); `written` = the job's "
      f"summary.bytes_written; `rbd diff` = bytes that changed on the target between the previous and the new snapshot.")
print()
print("| backup | dirtied | rounded | bitmap | total | done | read | written | rbd diff | written / rounded | seconds | MiB/s of total |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
names = ["full"] + [f"inc{p}" for p in dirty]
for n in names:
    full = n == "full"
    dirtied = size if full else m(f"{n}.client")
    rounded = size if full else m(f"{n}.rounded")
    bm = None if full else m(f"{n}.bitmap")
    w = m(f"{n}.written")
    ratio = w / rounded if rounded else None
    secs = m(f"{n}.secs")
    rate = med([vals[f"{n}.bytes_total"][rd] / vals[f"{n}.secs"][rd] for rd in rounds if rd in vals[f"{n}.secs"]]) / 1048576
    label = "full" if full else f"incremental {n[3:]}%"
    print(f"| {label} | {fmt_b(dirtied)} | {fmt_b(rounded)} | {fmt_b(bm)} | {fmt_b(m(n + '.bytes_total'))} | "
          f"{fmt_b(m(n + '.bytes_done'))} | {fmt_b(m(n + '.read'))} | {fmt_b(w)} | {fmt_b(m(n + '.diff'))} | "
          f"{ratio:.3f} | {secs:.2f} | {rate:,.0f} |")
print()
notes = []
for n in names[1:]:
    bad = []
    for rd in rounds:
        if rd not in vals[f"{n}.written"]:
            continue
        bound = vals[f"{n}.rounded"][rd]
        w, d = vals[f"{n}.written"][rd], vals[f"{n}.diff"][rd]
        if w > bound or d > bound:
            bad.append(f"round {rd}: written {w:,.0f}, rbd diff {d:,.0f} > {bound:,.0f}")
        bm = vals[f"{n}.bitmap"][rd]
        if bm != bound:
            notes.append(f"{n} round {rd}: bitmap dirty_bytes {bm:,.0f} != granules touched {bound:,.0f}")
        if vals[f"{n}.bytes_total"][rd] != bm:
            notes.append(f"{n} round {rd}: bytes_total {vals[f'{n}.bytes_total'][rd]:,.0f} != bitmap dirty_bytes {bm:,.0f}")
    goals.append((f"incremental {n[3:]}%: written <= dirty rounded up to the granularity (job and rbd diff, every round)",
                  not bad, "; ".join(bad) if bad else "max written/rounded %.3f" % max(
                      vals[f"{n}.written"][rd] / vals[f"{n}.rounded"][rd] for rd in rounds if rd in vals[f"{n}.written"])))
for n in names:
    for rd in rounds:
        if rd in vals[f"{n}.metric_written"] and vals[f"{n}.metric_written"][rd] != vals[f"{n}.written"][rd]:
            notes.append(f"{n} round {rd}: rbdsync_backup_last_written_bytes {vals[f'{n}.metric_written'][rd]:,.0f} "
                         f"!= summary.bytes_written {vals[f'{n}.written'][rd]:,.0f}")
        if rd in vals[f"{n}.diff"] and vals[f"{n}.diff"][rd] != vals[f"{n}.written"][rd]:
            notes.append(f"{n} round {rd}: rbd diff {vals[f'{n}.diff'][rd]:,.0f} != summary.bytes_written {vals[f'{n}.written'][rd]:,.0f}")
        if rd in vals[f"{n}.bytes_done"] and vals[f"{n}.bytes_done"][rd] != vals[f"{n}.bytes_total"][rd]:
            notes.append(f"{n} round {rd}: bytes_done != bytes_total")

print("## Client slowdown during a full backup")
print()
print(f"fio 4K randwrite IOPS on the NBD export with the agent idle (`before`) and while a full backup (no --speed) "
      f"runs (`during`: samples from {1} s after fio starts to the end of fio or of the backup, whichever is first).")
print()
print("| before IOPS | during IOPS | during / before | per round | measured during (s) | backup under load (s) | backup MiB/s under load | copy-before-write scratch |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
per = [vals["client.during"][rd] / vals["client.before"][rd] for rd in rounds if rd in vals["client.during"]]
b, d = m("client.before"), m("client.during")
if d is not None:
    r_cl = med(per)
    lr = [mib(vals["client.backup_total"][rd]) / vals["client.backup_secs"][rd] for rd in rounds]
    print(f"| {b:,.0f} | {d:,.0f} | {r_cl:.2f} | {', '.join(f'{x:.2f}' for x in per)} | {m('client.window_s'):.1f} | "
          f"{m('client.backup_secs'):.2f} | {med(lr):,.0f} | {fmt_b(m('client.scratch'))} |")
    goals.append(("client 4K randwrite IOPS during a full backup >= 0.8x before (median of per-round ratios)", r_cl >= 0.8, f"{r_cl:.2f}x"))
    short = [rd for rd in rounds if vals["client.window_s"].get(rd, 0) < 2]
    if short:
        notes.append(f"client: under 2 s of fio ran while the backup did in round(s) {short}; raise SIZE")
else:
    print(f"| {b:,.0f} | - | - | - | - | - | - | - |")
    notes.append("client: the backup ended before the measured window started; raise SIZE")
print()
print("## Goals")
print()
for g, ok, why in goals:
    print(f"- {g}: {'met' if ok else '**NOT met**'} ({why})")
loads = [v for k in vals if k.endswith(".load") for v in vals[k].values()]
print(f"- 1-minute load average after each backup: min {min(loads):.2f}, median {med(loads):.2f}, max {max(loads):.2f}; spread = (max - min) / median.")
for n in notes:
    print(f"- note: {n}")
EOF
}

# --- main ----------------------------------------------------------------------------------

main() {
    check_params
    check_tools
    ensure_built
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d /tmp/backup-bench.XXXXXX)
    SHM=$(mktemp -d /dev/shm/backup-bench.XXXXXX)
    mkdir -p "$WORK/out" "$SHM/images" "$(dirname "$OUT")"
    AGENT_BIN="$WORK/agent-under-test"
    cp "$RBDSYNC_BIN" "$AGENT_BIN"
    make_disk

    local hdr
    hdr=$(header)
    echo "$hdr"
    echo

    CSV="$WORK/runs.csv"
    echo "round,key,value" >"$CSV"
    local round
    for ((round = 1; round <= ROUNDS; round++)); do
        run_round "$round"
    done

    local table tail_line
    table=$(report "$CSV") || die "report failed (raw numbers: $CSV)"
    tail_line="- load average at end: $(cut -d' ' -f1-3 /proc/loadavg); OSD resident memory at the end of each round: $(awk -F, '$2 == "osd_rss_mib" {printf "%s%s MiB", n++ ? ", " : "", $3}' "$CSV")"
    {
        echo "$hdr"
        echo "$tail_line"
        echo
        echo "$table"
    } >"$OUT"
    cp "$CSV" "${OUT%.md}.csv"
    echo "$tail_line"
    echo
    echo "$table"
    echo
    echo "Written: $OUT (raw numbers: ${OUT%.md}.csv)"
}

main "$@"
