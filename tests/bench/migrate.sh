#!/usr/bin/env bash
# Migration benchmark: `rbdsync migrate` (incremental mirror seeded from the backup bitmap) against a
# `sync: full` mirror in the same run, cut-over downtime under a 4K random-write load, and the
# destination's stream job against `rbd bench` and `rbd export`, on a throw-away Ceph cluster
# (deploy/dev/ceph-cluster.sh: one mon + one memstore OSD on 127.0.0.1).
#
# Part 1, per round (fresh source agent, disk and backup image every round):
#   source vm1/disk0: a `file:` image of $SIZE, filled with random data through NBD (fio, 1M
#   sequential writes), bitmap `backup` (64 KiB granularity), one full backup to rbd:backup/IMG;
#   on a tmpfs destination, $SIZE written there and removed (warm_dest: the same memory for every
#   side). Then, for each level of $DIRTY (percent of the disk's 64 KiB granules written since that
#   backup, cumulative: 1 -> 5 -> 25), random 64 KiB granule-aligned writes of random data to
#   granules not written before (a seeded permutation), and with a fresh destination agent each:
#     full         the honest baseline: the destination prepared exactly as `migrate` prepares it
#                  (POST /v1/migrations: a `file:` child layered on the backup snapshot, hidden
#                  behind a token), `rbdsync mirror --sync full --wait` to its NBD export over TCP
#                  127.0.0.1, `job complete` (cut-over), then the source is taken back
#                  (DELETE .../fence) and the destination aborted
#     incremental  `rbdsync migrate vm1 --to DEST --bitmap backup` (prepare, incremental mirror,
#                  cut-over, fence, activate, stream), then DELETE .../fence on the source
#   (the order of the two alternates), then on the incremental destination:
#     stream       the stream job `migrate` started, timed by the job itself (summary.duration_ms:
#                  start to parent detached), against
#                  `rbd bench --io-type read --io-pattern seq --io-size 4M` over the whole backup image
#                  (--io-threads 16, rbd bench's default, and 1; the stream has 8 chunks of 4 MiB in
#                  flight; plus 64K reads on 1 thread, an earlier stream's copy-up pattern),
#                  none of which writes anything; and against the fair peer, which does what the
#                  stream does (read the backup snapshot, write it to a local file, make it durable):
#                  `rbd export POOL/IMAGE@SNAP` (the stream's parent) to a file on the destination's
#                  filesystem followed by `sync --data` (fdatasync) of that file, timed together,
#                  after the destination agent is gone (its image deleted first: one copy at a time)
#   Bytes sent, mirror time and downtime come from the mirror job's summary (`migrate --json`
#   prints it; `job wait --json` for the full mirror). The incremental/full byte ratio should be
#   about the dirty fraction.
# Part 2 (on a fresh cluster): $CUTOVERS cut-overs of a smaller disk ($DT_SIZE, vm2/disk0, images on
#   tmpfs) under fio's nbd engine doing 4K random writes at iodepth $DT_QD on the source export (Unix
#   socket). One full backup, then per cut-over a fresh migration: fresh destination agent, fio
#   started, $DT_WARMUP s later `migrate --no-stream`; fio ends when the source turns read-only
#   (EPERM); the source is taken back (DELETE .../fence). Downtime = the mirror's downtime_ms (hold
#   writes -> drain -> copy the rest -> flush destination -> read-only); also reported: the time from
#   then until the destination is live (agents' logs), and fio's own latencies.
# Output: a Markdown report on stdout, also written to tests/bench/results/migrate-DATE.md (raw rows
# in migrate-DATE.csv and migrate-DATE-cutover.csv).
#
# Usage: tests/bench/migrate.sh
# Environment:
#   ROUNDS=2           rounds of part 1 (each: fill + full backup + every level)
#   SIZE=4GiB          disk of part 1 (the memstore OSD keeps ~2x its backup in RAM)
#   DIRTY="1 5 25"     dirty levels, percent of the disk's granules, increasing (cumulative writes)
#   CUTOVERS=20        cut-overs of part 2 (0 skips part 2)
#   DT_SIZE=256MiB     disk of part 2
#   DT_WARMUP=1        seconds of fio load before each migrate of part 2
#   DT_QD=16           fio iodepth of part 2
#   STREAM=1           0 skips the stream/rbd bench part
#   SEED=1             seed of the dirty-granule permutation
#   IMAGES_PARENT=/var/tmp  where part 1's agents (and their $SIZE images) live; on disk by default:
#                      the memstore OSD already holds ~2x SIZE of RAM for the backup
#   DEST_DIR=          where part 1's destination agents (state, $SIZE image) and the `rbd export`
#                      file live: the script makes (and removes) its own directory in it; created
#                      (and removed at the end, if empty) when missing. Default: empty, i.e. with the
#                      source under IMAGES_PARENT. DEST_DIR=/dev/shm/rbdsync-dest takes the destination
#                      disk out of the stream vs `rbd export` comparison (one $SIZE copy in RAM at a
#                      time: each destination is deleted before the next, and before the export)
#   WORK_PARENT=/dev/shm   work directory: logs, outputs, part 2's agents and images (the cluster
#                      lives under /tmp)
#   RBDSYNC_BIN=...    agent binary (default target/release/rbdsync, built if missing); copied first
#   CEPH_MEMSTORE_BYTES  passed to ceph-cluster.sh (its default: 8 GiB)
#   KEEP=1             keep the work directory (logs, configs, JSON outputs)
# Needs: ceph (mon, osd, rbd CLI), fio with the nbd engine, python3-libnbd (/usr/bin/python3), jq, curl.
# Default run (2 cores): ~4 min per round of part 1 (fill + backup ~20 s, per level ~70 s: full
# mirror ~20 s, stream ~30 s, rbd bench ~15 s, rbd export ~15 s), ~2-3 min for the 20 cut-overs:
# ~12 minutes.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-2}
SIZE=${SIZE:-4GiB}
DIRTY=${DIRTY:-"1 5 25"}
CUTOVERS=${CUTOVERS:-20}
DT_SIZE=${DT_SIZE:-256MiB}
DT_WARMUP=${DT_WARMUP:-1}
DT_QD=${DT_QD:-16}
STREAM=${STREAM:-1}
SEED=${SEED:-1}
WORK_PARENT=${WORK_PARENT:-/dev/shm}
IMAGES_PARENT=${IMAGES_PARENT:-/var/tmp}
DEST_DIR=${DEST_DIR:-}
KEEP=${KEEP:-0}
GRAN=$((64 << 10))

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
RBDSYNC=${RBDSYNC_BIN:-$REPO_DIR/target/release/rbdsync}
CLUSTER_SH="$REPO_DIR/deploy/dev/ceph-cluster.sh"
PY=/usr/bin/python3 # the system Python has libnbd's bindings (python3-libnbd)

WORK=""
BIG="" # part 1's agent directories (big images)
DEST="" # part 1's destination agent directories and rbd export files ($BIG unless DEST_DIR is set)
DEST_MADE=0 # 1 when this script created DEST_DIR (removed on exit if empty)
CEPH_DIR="" # this script's current cluster (stopped on exit)
CONF=""
BIN=""      # the copy of the agent binary (its name holds no "rbdsync")
declare -A AGENT_PIDS=() # agent directory -> pid, for every agent this script started
FIO_PID=""
ORIG_CMDLINE="$0${*:+ $*}"
STAMP=$(date +%Y-%m-%d-%H%M)

die() {
    if [[ -z $WORK || (-d $WORK && ! -e $WORK/interrupted) ]]; then
        echo "migrate.sh: error: $*" >&2
    fi
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

now() { date +%s.%N; }

rbd_() { timeout -k 10 120 rbd -c "$CONF" "$@"; }

# --- cleanup (stop_pid: lib.sh) ------------------------------------------------------------

# stop_agent DIR: stops the agent running on DIR (if this script started one there).
stop_agent() {
    local dir=$1 pid=${AGENT_PIDS[$1]:-}
    [[ -n $pid ]] || return 0
    unset "AGENT_PIDS[$dir]"
    stop_pid "$pid" "agent $dir"
}

stop_fio() {
    local pid=$FIO_PID
    [[ -n $pid ]] || return 0
    FIO_PID=""
    stop_pid "$pid" fio
}

remove_rbd_image() {
    local img=$1
    rbd_ snap purge --no-progress "$img" >/dev/null 2>&1 || true
    rbd_ rm --no-progress "$img" >/dev/null 2>&1 || echo "migrate.sh: could not remove $img" >&2
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -gt 128 && -n $WORK && -d $WORK ]]; then
        : >"$WORK/interrupted"
    fi
    stop_fio
    local dir
    for dir in "${!AGENT_PIDS[@]}"; do
        stop_agent "$dir"
    done
    stop_cluster "$rc"
    if [[ -n $BIG && -d $BIG ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            find "$BIG" -name '*.raw' -delete 2>/dev/null || true
            echo "migrate.sh: part 1 directory kept (without images): $BIG" >&2
        else
            rm -rf "$BIG"
        fi
    fi
    if [[ -n $DEST && $DEST != "$BIG" && -d $DEST ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            find "$DEST" -name '*.raw' -delete 2>/dev/null || true
            echo "migrate.sh: destination directory kept (without images): $DEST" >&2
        else
            rm -rf "$DEST"
        fi
    fi
    [[ $DEST_MADE == 0 ]] || rmdir "$DEST_DIR" 2>/dev/null || true
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            # Images are big and in RAM (tmpfs): never keep them.
            find "$WORK" \( -name '*.raw' -o -name agent-under-test \) -delete 2>/dev/null || true
            echo "migrate.sh: work directory kept (without images): $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# --- checks and setup ----------------------------------------------------------------------



check_params() {
    [[ $ROUNDS =~ ^[0-9]+$ ]] || die "ROUNDS must be a non-negative integer (got '$ROUNDS')"
    [[ $CUTOVERS =~ ^[0-9]+$ ]] || die "CUTOVERS must be a non-negative integer (got '$CUTOVERS')"
    [[ $DT_QD =~ ^[1-9][0-9]*$ ]] || die "DT_QD must be a positive integer (got '$DT_QD')"
    [[ $DT_WARMUP =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DT_WARMUP must be seconds (got '$DT_WARMUP')"
    ((ROUNDS + CUTOVERS > 0)) || die "nothing to do (ROUNDS=0 and CUTOVERS=0)"
    SIZE_B=$(bytes "$SIZE" SIZE)
    DT_SIZE_B=$(bytes "$DT_SIZE" DT_SIZE)
    ((SIZE_B >= 64 << 20 && SIZE_B % (4 << 20) == 0)) || die "SIZE must be a multiple of 4 MiB, at least 64 MiB"
    ((DT_SIZE_B >= 16 << 20 && DT_SIZE_B % (4 << 20) == 0)) || die "DT_SIZE must be a multiple of 4 MiB, at least 16 MiB"
    local prev=0 d
    for d in $DIRTY; do
        [[ $d =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DIRTY: bad percentage '$d'"
        awk -v a="$prev" -v b="$d" 'BEGIN { exit !(b > a && b <= 100) }' ||
            die "DIRTY must be increasing percentages in (0, 100] (got '$DIRTY')"
        prev=$d
    done
    [[ -n $DIRTY ]] || die "DIRTY is empty"
    [[ -d $WORK_PARENT ]] || die "WORK_PARENT=$WORK_PARENT is not a directory"
    [[ -d $IMAGES_PARENT ]] || die "IMAGES_PARENT=$IMAGES_PARENT is not a directory"
    if [[ -n $DEST_DIR ]]; then
        [[ $DEST_DIR == /* ]] || die "DEST_DIR must be an absolute path (got '$DEST_DIR')"
        [[ -d $DEST_DIR || (! -e $DEST_DIR && -d $(dirname "$DEST_DIR")) ]] ||
            die "DEST_DIR=$DEST_DIR is neither a directory nor a new directory in an existing one"
    fi
}

# dest_fs: a directory on the filesystem that will hold part 1's destinations and rbd export files.
dest_fs() {
    if [[ -z $DEST_DIR ]]; then
        echo "$IMAGES_PARENT"
    elif [[ -d $DEST_DIR ]]; then
        echo "$DEST_DIR"
    else
        dirname "$DEST_DIR"
    fi
}

check_tools() {
    need rbd ceph-common
    need ceph-mon ceph-mon
    need ceph-osd ceph-osd
    need fio fio
    need jq jq
    need curl curl
    need timeout coreutils
    "$PY" -c 'import nbd' 2>/dev/null || die "$PY cannot import nbd; install it with: apt-get install -y python3-libnbd"
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd failed)"
    [[ -x $CLUSTER_SH ]] || die "$CLUSTER_SH missing"
}

# Refuses to start when the data would not fit in RAM: the memstore OSD holds about twice the
# bytes written to it (measured: ~2.1 GiB RSS for a 1 GiB backup), plus images on tmpfs: part 1
# has at most one source image and one destination image (or rbd export file) at a time.
check_memory() {
    local avail need_b tmpfs_big=0 tmpfs_dest=0 tmpfs_work=0
    avail=$(($(awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo) * 1024))
    [[ $(stat -f -c %T "$IMAGES_PARENT") != tmpfs ]] || tmpfs_big=1
    [[ $(stat -f -c %T "$(dest_fs)") != tmpfs ]] || tmpfs_dest=1
    [[ $(stat -f -c %T "$WORK_PARENT") != tmpfs ]] || tmpfs_work=1
    need_b=$((DT_SIZE_B * (4 + 2 * tmpfs_work) + (1 << 30)))
    ((ROUNDS == 0)) || need_b=$((need_b + SIZE_B * 9 / 4 + SIZE_B * (tmpfs_big + tmpfs_dest)))
    ((avail >= need_b)) || die "not enough memory: $((avail >> 20)) MiB available, about $((need_b >> 20)) MiB needed
for SIZE=$SIZE (the memstore OSD holds ~2x the backup; images on tmpfs count in full: IMAGES_PARENT, DEST_DIR); use a smaller SIZE"
}

ensure_built() {
    if [[ ! -x $RBDSYNC ]]; then
        [[ $RBDSYNC == "$REPO_DIR/target/release/rbdsync" ]] || die "$RBDSYNC is not an executable file"
        need cargo cargo
        log "building: cargo build --release -p agent"
        (cd "$REPO_DIR" && cargo build --release -p agent) >&2
        [[ -x $RBDSYNC ]] || die "cargo build did not produce $RBDSYNC"
    fi
}

# start_cluster: a fresh cluster (each part gets its own: memstore keeps what it once held, about
# 2x the backup's bytes, even after the image is removed).
start_cluster() {
    CEPH_DIR=$(mktemp -d /tmp/rbdsync-migrate-ceph.XXXXXX)
    log "starting a throw-away cluster in $CEPH_DIR"
    "$CLUSTER_SH" up "$CEPH_DIR" >"$WORK/ceph-up.log" 2>&1 ||
        die "ceph-cluster.sh up failed: $(tail -n 20 "$WORK/ceph-up.log")"
    CONF="$CEPH_DIR/ceph.conf"
    rbd_ ls backup >/dev/null || die "'rbd -c $CONF ls backup' failed"
}

# stop_cluster [RC]: stops this script's current cluster; its directory is kept with KEEP=1 or on failure.
stop_cluster() {
    local rc=${1:-0}
    [[ -n $CEPH_DIR ]] || return 0
    "$CLUSTER_SH" down "$CEPH_DIR" >/dev/null 2>&1 || echo "migrate.sh: stopping the cluster in $CEPH_DIR failed" >&2
    if [[ $KEEP == 1 || $rc -eq 1 ]]; then
        echo "migrate.sh: cluster directory kept (logs): $CEPH_DIR" >&2
    else
        rm -rf "$CEPH_DIR"
    fi
    CEPH_DIR=""
}

osd_pid() {
    cat "$CEPH_DIR/run/osd.0.pid" 2>/dev/null || true
}

osd_rss() {
    local pid
    pid=$(osd_pid)
    [[ -n $pid ]] || { echo "?"; return; }
    awk '$1 == "VmRSS:" {printf "%d", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "?"
}

# --- agents and the control API ------------------------------------------------------------

# start_agent DIR [VM_NAME VM_YAML]: an agent on DIR (TCP 127.0.0.1:0 + Unix NBD listeners, control
# socket DIR/control.sock, the cluster's ceph.conf), with one VM file if given. Sets TCP to its NBD
# TCP address.
start_agent() {
    local dir=$1 i
    rm -rf "$dir"
    mkdir -p "$dir/vms.d" "$dir/state" "$dir/images"
    cat >"$dir/agent.yaml" <<EOF
node: $(basename "$dir")
state_dir: $dir/state
vms_dir: $dir/vms.d
nbd:
  listen: ["127.0.0.1:0", "unix:$dir/nbd.sock"]
control:
  listen: ["unix:$dir/control.sock"]
ceph:
  conf: $CONF
  client: admin
EOF
    [[ $# -lt 3 ]] || echo "$3" >"$dir/vms.d/$2.yaml"
    "$BIN" agent --config "$dir/agent.yaml" >>"$dir/agent.log" 2>&1 &
    AGENT_PIDS[$dir]=$!
    for ((i = 0; i < 600; i++)); do
        [[ -s $dir/state/agent.json && -S $dir/nbd.sock && -S $dir/control.sock ]] && break
        kill -0 "${AGENT_PIDS[$dir]}" 2>/dev/null || die "agent in $dir exited during startup: $(tail -n 5 "$dir/agent.log")"
        sleep 0.05
    done
    [[ -s $dir/state/agent.json ]] || die "agent in $dir not serving within 30 s; see $dir/agent.log"
    TCP=$(jq -r '[.nbd[] | select(startswith("unix:") | not)][0]' "$dir/state/agent.json")
    [[ $TCP =~ ^127\.0\.0\.1:[0-9]+$ ]] || die "no TCP NBD listener in $dir/state/agent.json"
}

# discard_dir DIR: removes a stopped agent's directory (with KEEP=1 only its images).
discard_dir() {
    if [[ $KEEP == 1 ]]; then
        find "$1" -name '*.raw' -delete 2>/dev/null || true
    else
        rm -rf "$1"
    fi
}

# cli DIR ARGS...: the rbdsync CLI against the agent on DIR (JSON output), with a timeout.
cli() {
    local dir=$1
    shift
    timeout 900 "$BIN" --control "unix:$dir/control.sock" --json "$@"
}

# api DIR METHOD PATH [BODY]: the control API through curl; prints the body, fails on HTTP >= 400.
api() {
    local dir=$1 method=$2 path=$3 body=${4:-} out code
    local -a data=()
    [[ -z $body ]] || data=(-H 'Content-Type: application/json' --data "$body")
    out=$(curl -sS --max-time 120 --unix-socket "$dir/control.sock" -X "$method" "${data[@]}" \
        -w '\n%{http_code}' "http://agent$path") || die "curl $method $path failed"
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    ((code < 400)) || die "$method $path: HTTP $code: $out"
    printf '%s\n' "$out"
}

# wait_job DIR ID LIMIT_S [POLL_S]: polls the job every POLL_S seconds (default 0.05) until it
# concludes; prints its JSON. The poll matches the compact JSON with a bash pattern rather than
# jq: jq starts cost a noticeable share of these 2 cores while a job being timed runs.
wait_job() {
    local dir=$1 id=$2 limit=$3 poll=${4:-0.05} j deadline
    deadline=$(($(date +%s) + limit))
    while :; do
        j=$(api "$dir" GET "/v1/jobs/$id")
        [[ $j != *'"state":"concluded"'* ]] || break
        (($(date +%s) < deadline)) || die "job $id on $dir not concluded after $limit s: $j"
        sleep "$poll"
    done
    printf '%s\n' "$j"
}

# vm_yaml VM SIZE_B BACKUP_IMAGE [KEEP]: a VM with one file: disk, bitmap backup, backups to rbd.
vm_yaml() {
    local keep=${4:+, keep: $4}
    cat <<EOF
name: $1
disks:
  - name: disk0
    image: file:images/$1-disk0.raw
    size: $(($2 >> 20))MiB
    bitmaps: [{name: backup, granularity: 64KiB}]
    backup: {target: "rbd:$3", bitmap: backup$keep}
EOF
}

# fill DIR DISK SIZE_B: random data over the whole disk through NBD (1M sequential writes).
fill() {
    local dir=$1 disk=$2 size=$3
    timeout 600 fio --name=fill --ioengine=nbd --uri="nbd+unix:///$disk?socket=$dir/nbd.sock" --rw=write \
        --bs=1M --iodepth=4 --size="$size" --refill_buffers --output="$WORK/out/fill-$(basename "$dir").txt" \
        >/dev/null 2>&1 || die "filling $disk failed: $(tail -n 5 "$WORK/out/fill-$(basename "$dir").txt")"
}

# backup DIR DISK OUT: a backup (full the first time, incremental after), which must succeed.
backup() {
    local dir=$1 disk=$2 out=$3
    cli "$dir" backup "$disk" --wait >"$out" 2>"$out.err" || die "backup of $disk failed: $(cat "$out" "$out.err" | tail -n 5)"
    [[ $(jq -r 'if type == "array" then .[0] else . end | .result' "$out") == success ]] ||
        die "backup of $disk did not succeed: $(cat "$out")"
}

dirty_bytes() {
    api "$1" GET "/v1/disks/$2/bitmaps/backup" | jq -r .dirty_bytes
}

# dirty DIR DISK SIZE_B FROM_PCT TO_PCT: writes random data to the granules FROM..TO percent of a
# seeded permutation of all granules (64 KiB each, granule-aligned), i.e. to new granules only.
dirty() {
    "$PY" - "nbd+unix:///$2?socket=$1/nbd.sock" "$3" "$GRAN" "$SEED" "$4" "$5" <<'EOF'
import os, random, sys
import nbd
uri, size, gran, seed, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
n = size // gran
perm = list(range(n))
random.Random(seed).shuffle(perm)
a, b = round(n * lo / 100), round(n * hi / 100)
h = nbd.NBD()
h.connect_uri(uri)
pool = os.urandom((1 << 20) + gran)
rnd = random.Random(seed * 7919 + a)
for k in range(a, b):
    o = rnd.randrange(0, 1 << 20)
    data = bytearray(pool[o:o + gran])
    data[:8] = k.to_bytes(8, "little")
    h.pwrite(bytes(data), perm[k] * gran)
h.flush()
h.shutdown()
print(b - a)
EOF
}

# --- part 1: incremental vs full mirror, stream ---------------------------------------------

# run_full SRC DEST CSV_PREFIX: the full-mirror baseline; prints "bytes_sent mirror_ms downtime_ms wall_s".
run_full() {
    local src=$1 dst=$2 tag=$3 chain backing prep id exp job t0 t1 out="$WORK/out/$3-full"
    chain=$(api "$src" GET "/v1/disks/vm1/disk0/chain?bitmap=backup")
    [[ $(jq -r .matches <<<"$chain") == true ]] || die "source chain does not match its bitmap: $chain"
    backing=$(jq -r .backing <<<"$chain")
    t0=$(now)
    prep=$(api "$dst" POST /v1/migrations "{\"vm\": \"vm1\", \"disks\": [{\"name\": \"disk0\", \"backing\": \"$backing\"}]}")
    id=$(jq -r .id <<<"$prep")
    exp=$(jq -r '.disks[0].export' <<<"$prep")
    cli "$src" mirror vm1/disk0 --target "nbd://$TCP_DST/$exp" --sync full --wait >"$out-mirror.json" 2>"$out-mirror.err" ||
        die "full mirror failed: $(tail -n 5 "$out-mirror.json" "$out-mirror.err")"
    job=$(jq -r .id "$out-mirror.json")
    [[ $(jq -r .state "$out-mirror.json") == ready ]] || die "full mirror not ready: $(cat "$out-mirror.json")"
    cli "$src" job complete "$job" >/dev/null || die "job complete $job failed"
    wait_job "$src" "$job" 600 >"$out-job.json"
    t1=$(now)
    [[ $(jq -r .result "$out-job.json") == success ]] || die "full mirror did not succeed: $(cat "$out-job.json")"
    api "$src" DELETE /v1/disks/vm1/disk0/fence >/dev/null
    api "$dst" POST "/v1/migrations/$id/abort" >/dev/null
    jq -r --arg w "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" \
        '.summary | "\(.bytes_sent) \(.duration_ms) \(.downtime_ms) \($w)"' "$out-job.json"
}

# run_incremental SRC DEST TAG: `rbdsync migrate`; prints "bytes_sent mirror_ms downtime_ms wall_s
# initial_dirty passes stream_job t_end".
run_incremental() {
    local src=$1 dst=$2 tag=$3 t0 t1 out="$WORK/out/$3-incremental.json"
    t0=$(now)
    cli "$src" migrate vm1 --to "unix:$dst/control.sock" --bitmap backup >"$out" 2>"$out.err" ||
        die "migrate failed: $(tail -n 5 "$out" "$out.err")"
    t1=$(now)
    api "$src" DELETE /v1/disks/vm1/disk0/fence >/dev/null
    jq -r --arg w "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')" --arg t1 "$t1" \
        '.disks[0] as $d | "\($d.bytes_sent) \($d.mirror_ms) \($d.downtime_ms) \($w) \($d.initial_dirty_bytes) \($d.passes) \(.stream_jobs[0] // "none") \($t1)"' "$out"
}

# rbd_bench_read_cpu IMAGE THREADS IO_SIZE TOTAL OUT: "MiB/s CPU_S OSD_CPU_S": rbd_bench_read, with
# the CPU seconds of the rbd process (user + system) and of the OSD meanwhile.
rbd_bench_read_cpu() {
    local osd0 osd1 rate
    osd0=$(proc_ticks "$(osd_pid)")
    local TIMEFORMAT='%U %S'
    { time rbd_bench_read "$@" >"$5.rate"; } 2>"$5.time"
    osd1=$(proc_ticks "$(osd_pid)")
    rate=$(<"$5.rate")
    echo "$rate $(awk '{printf "%.3f", $1 + $2}' "$5.time") $( [[ -n $osd0 && -n $osd1 ]] && ticks_s "$((osd1 - osd0))" || echo -)"
}

# rbd_bench_read IMAGE THREADS IO_SIZE TOTAL OUT: MiB/s of a sequential read of TOTAL bytes.
rbd_bench_read() {
    rbd_ bench --io-type read --io-pattern seq --io-size "$3" --io-threads "$2" --io-total "$4" "$1" >"$5" 2>&1 ||
        die "rbd bench failed: $(tail -n 5 "$5")"
    awk -v sz="$3" '/elapsed:/ { for (i = 1; i <= NF; i++) if ($i == "ops/sec:") printf "%.1f\n", $(i + 1) * sz / 1048576 }' "$5"
}

# rbd_export_timed SNAP FILE LOG: `rbd export SNAP FILE` (SNAP: POOL/IMAGE@SNAP) then fdatasync of
# FILE, timed together; prints "total_s sync_s cpu_s osd_cpu_s" (CPU: the rbd and sync processes,
# user + system; the OSD's meanwhile); removes FILE.
#
# Durability, so that the two figures compare like with like: the stream's time runs until its job
# concludes, which is after detach_parent (agent/src/jobs/stream.rs -> FileStore::detach_parent in
# agent/src/store/file/mod.rs): that flush()es the image (fdatasync of the `file:` image, then the
# owned map's changed words written and fdatasynced), rewrites the sidecar atomically (temp file,
# fsync, rename, fsync of the directory), registers the child on the parent and drops the hold on
# the backup snapshot. So the stream's figure includes an fdatasync of every byte it copied (plus a
# few small metadata writes and syncs); the export's figure includes the same fdatasync (`sync
# --data FILE`, fdatasync(2) of that file only: not syncfs, which would also flush unrelated dirty
# data on the filesystem) and nothing else. Both write through the page cache, so on a disk part of
# the writeback happens while copying, and the final sync waits for the rest. Before the timer
# starts, `sync -f` settles the filesystem (the removed destination image, the source's writes when
# they share it), as the stream starts right after the cut-over's flush of the destination.
rbd_export_timed() {
    local snap=$1 file=$2 log=$3 t0 t1 t2 got osd0 osd1 osd="-"
    rm -f "$file"
    sync -f "$(dirname "$file")" || true
    osd0=$(proc_ticks "$(osd_pid)")
    local TIMEFORMAT='%U %S'
    t0=$(now)
    { time timeout -k 10 900 rbd -c "$CONF" export --no-progress "$snap" "$file" >"$log" 2>&1; } 2>"$log.time" || {
        rm -f "$file"
        die "rbd export $snap failed: $(tail -n 5 "$log")"
    }
    t1=$(now)
    { time sync --data "$file"; } 2>"$log.sync-time" || { rm -f "$file"; die "sync --data $file failed"; }
    t2=$(now)
    osd1=$(proc_ticks "$(osd_pid)")
    [[ -z $osd0 || -z $osd1 ]] || osd=$(ticks_s "$((osd1 - osd0))")
    got=$(stat -c %s "$file")
    rm -f "$file"
    ((got == SIZE_B)) || die "rbd export of $snap wrote $got bytes, not $SIZE_B"
    awk -v a="$t0" -v b="$t1" -v c="$t2" -v osd="$osd" '{cpu += $1 + $2} END {printf "%.3f %.3f %.3f %s\n", c - a, c - b, cpu, osd}' \
        "$log.time" "$log.sync-time"
}

# warm_dest: on a tmpfs $DEST, writes and removes a $SIZE file first. On this VM, memory that
# has not been written for a while is slow to write the first time under the benchmark's memory
# load (perf: the kernel's copy into tmpfs pages dominates), and the first side to write $SIZE
# on $DEST pays for it: the stream ran at ~0.4x `rbd export` when it went first and ~1.2x when
# the full mirror's destination had just written there (2026-11-27). Warming $DEST once per
# round gives every side the same memory.
warm_dest() {
    [[ $(stat -f -c %T "$DEST") == tmpfs ]] || return 0
    local t0 t1
    t0=$(now)
    dd if=/dev/zero of="$DEST/warm.raw" bs=4M count=$((SIZE_B >> 22)) status=none || die "warming $DEST failed"
    rm -f "$DEST/warm.raw"
    t1=$(now)
    log "warmed $DEST (wrote and removed $SIZE in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s)"
}

run_round() {
    local round=$1 csv=$2 prev=0 level=0 d
    local src="$BIG/r$round-src" img="backup/mig-$$-r$round"
    log "round $round: source agent, ${SIZE} disk, fill with random data"
    start_agent "$src" vm1 "$(vm_yaml vm1 "$SIZE_B" "$img")"
    fill "$src" vm1/disk0 "$SIZE_B"
    log "round $round: full backup to rbd:$img"
    local t0 t1
    t0=$(now)
    backup "$src" vm1/disk0 "$WORK/out/r$round-backup.json"
    t1=$(now)
    log "round $round: full backup took $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s; OSD RSS $(osd_rss) MiB"
    [[ $(dirty_bytes "$src" vm1/disk0) == 0 ]] || die "bitmap not clean after the full backup"
    warm_dest
    for d in $DIRTY; do
        level=$((level + 1))
        local tag="r$round-d$d" written dbytes
        written=$(dirty "$src" vm1/disk0 "$SIZE_B" "$prev" "$d") || die "dirtying failed"
        prev=$d
        dbytes=$(dirty_bytes "$src" vm1/disk0)
        log "round $round, dirty $d%: $written granules written now, bitmap: $dbytes bytes dirty since the backup; OSD RSS $(osd_rss) MiB, MemAvailable $(awk '$1 == "MemAvailable:" {printf "%d", $2 / 1024}' /proc/meminfo) MiB"
        local full_r inc_r
        local order="full incremental"
        (((round + level) % 2)) || order="incremental full"
        for mode in $order; do
            local dst="$DEST/$tag-$mode-dst"
            start_agent "$dst"
            TCP_DST=$TCP
            if [[ $mode == full ]]; then
                full_r=$(run_full "$src" "$dst" "$tag")
                log "  full:        sent/mirror ms/downtime ms/wall s = $full_r"
                stop_agent "$dst"
                discard_dir "$dst"
            else
                inc_r=$(run_incremental "$src" "$dst" "$tag")
                # CPU from here to the stream's end: the destination agent (streaming) and the OSD.
                local agent0 osd0 stream_cpu="- -"
                agent0=$(proc_ticks "${AGENT_PIDS[$dst]}")
                osd0=$(proc_ticks "$(osd_pid)")
                log "  incremental: sent/mirror ms/downtime ms/wall s/seeded/passes/stream job = ${inc_r% *}"
                local stream_job stream_r="- - -" bench16="- - -" bench1="-" bench64k="-" parent="" export_r="- - - -"
                read -r _ _ _ _ _ _ stream_job _ <<<"$inc_r"
                if [[ $STREAM == 1 && $stream_job != none ]]; then
                    # The stream's time is its own (summary.duration_ms: job start to detached), so
                    # the poll can be slow: a curl every 50 ms cost ~1/4 of a core, taken from the
                    # stream being timed (perf, 2026-11-27).
                    local sj
                    sj=$(wait_job "$dst" "$stream_job" 900 1)
                    local agent1 osd1
                    agent1=$(proc_ticks "${AGENT_PIDS[$dst]}")
                    osd1=$(proc_ticks "$(osd_pid)")
                    if [[ -n $agent0 && -n $agent1 && -n $osd0 && -n $osd1 ]]; then
                        stream_cpu="$(ticks_s "$((agent1 - agent0))") $(ticks_s "$((osd1 - osd0))")"
                    fi
                    printf '%s\n' "$sj" >"$WORK/out/$tag-stream.json"
                    [[ $(jq -r .result <<<"$sj") == success ]] || die "stream failed: $sj"
                    stream_r=$(jq -r '.summary | "\(.bytes_copied) \((.duration_ms // 0) / 1000) "' <<<"$sj")$(jq -r .bytes_total <<<"$sj")
                    parent=$(jq -r '.summary.parent // ""' <<<"$sj")
                    if [[ -z $parent ]]; then
                        log "  stream $stream_job had no parent: no rbd export"
                    else
                        [[ $parent == rbd:*@* ]] || die "stream $stream_job: parent '$parent' is not an RBD snapshot: $sj"
                        parent=${parent#rbd:}
                    fi
                    log "  stream:      bytes copied/s/disk = $stream_r"
                    bench16=$(rbd_bench_read_cpu "$img" 16 $((4 << 20)) "$SIZE_B" "$WORK/out/$tag-rbdbench16.txt")
                    bench1=$(rbd_bench_read "$img" 1 $((4 << 20)) "$SIZE_B" "$WORK/out/$tag-rbdbench1.txt")
                    # The stream's access pattern (one 64 KiB granule read at a time), for diagnosis.
                    bench64k=$(rbd_bench_read "$img" 1 "$GRAN" $((SIZE_B < 1 << 30 ? SIZE_B : 1 << 30)) "$WORK/out/$tag-rbdbench64k.txt")
                    log "  rbd bench seq read: 4M ${bench16%% *} MiB/s (16 threads), 4M $bench1 MiB/s (1 thread), 64K $bench64k MiB/s (1 thread)"
                fi
                stop_agent "$dst"
                discard_dir "$dst"
                if [[ -n $parent ]]; then
                    # The fair peer, after the destination is gone (one $SIZE copy on DEST at a time).
                    export_r=$(rbd_export_timed "$parent" "$DEST/$tag-rbd-export.raw" "$WORK/out/$tag-rbd-export.txt")
                    log "  rbd export + fdatasync: $(awk -v s="$SIZE_B" -v t="${export_r%% *}" 'BEGIN {printf "%.1f", s / 1048576 / t}') MiB/s (s total/of which fdatasync/CPU/OSD CPU = $export_r)"
                fi
                inc_r="${inc_r% * *} $stream_r $bench1 $bench64k $export_r $bench16 $stream_cpu"
            fi
        done
        echo "$round,$d,$dbytes,$SIZE_B,${full_r// /,},${inc_r// /,},$(cut -d' ' -f1 /proc/loadavg)" >>"$csv"
    done
    stop_agent "$src"
    discard_dir "$src"
    remove_rbd_image "$img"
}

# --- part 2: cut-over downtime under load ---------------------------------------------------

run_cutovers() {
    local csv=$1 src="$WORK/dt-src" img="backup/mig-$$-dt" i
    log "cut-overs: source agent, $DT_SIZE disk, fill, full backup"
    start_agent "$src" vm2 "$(vm_yaml vm2 "$DT_SIZE_B" "$img")"
    fill "$src" vm2/disk0 "$DT_SIZE_B"
    # One full backup: every migration is seeded with all granules written since (the migrations do
    # not consume the bitmap, and the load rewrites the whole disk within the warm-up anyway).
    backup "$src" vm2/disk0 "$WORK/out/dt-backup.json"
    for ((i = 1; i <= CUTOVERS; i++)); do
        local out="$WORK/out/dt-$i" dst="$WORK/dt-$i-dst" fio_json
        start_agent "$dst"
        fio_json="$out-fio.json"
        timeout 300 fio --name=load --ioengine=nbd --uri="nbd+unix:///vm2/disk0?socket=$src/nbd.sock" \
            --rw=randwrite --bs=4k --iodepth="$DT_QD" --size="$DT_SIZE_B" --time_based --runtime=240 \
            --norandommap --randrepeat=0 --output-format=json --output="$fio_json" >"$out-fio.stdout" 2>&1 &
        FIO_PID=$!
        sleep "$DT_WARMUP"
        kill -0 "$FIO_PID" 2>/dev/null || die "fio ended before the migration: $(tail -n 5 "$out-fio.stdout")"
        cli "$src" migrate vm2 --to "unix:$dst/control.sock" --bitmap backup --no-stream >"$out-migrate.json" 2>"$out-migrate.err" ||
            die "migrate (cut-over $i) failed: $(tail -n 5 "$out-migrate.json" "$out-migrate.err")"
        # fio ends by itself on the first write refused by the now read-only source.
        local k
        for ((k = 0; k < 200; k++)); do
            kill -0 "$FIO_PID" 2>/dev/null || break
            sleep 0.05
        done
        kill -0 "$FIO_PID" 2>/dev/null && log "  fio still running 10 s after the cut-over; stopping it"
        stop_fio
        local mirror_job
        mirror_job=$(cli "$src" jobs --all |
            jq -r '[.[] | select(.kind == "mirror")] | max_by(.id | capture("(?<n>[0-9]+)$").n | tonumber) | .id')
        cli "$src" job show "$mirror_job" >"$out-mirror.json"
        api "$src" DELETE /v1/disks/vm2/disk0/fence >/dev/null
        stop_agent "$dst"
        local row
        row=$("$PY" - "$out-migrate.json" "$out-mirror.json" "$fio_json" "$src/agent.log" "$dst/agent.log" <<'EOF'
import datetime, json, re, sys
def stamp(path, pattern):
    for line in open(path, errors="replace"):
        if re.search(pattern, line):
            t = line.split()[0].rstrip("Z")
            return datetime.datetime.fromisoformat(t[:26])
    return None
m = json.load(open(sys.argv[1]))
j = json.load(open(sys.argv[2]))
d = m["disks"][0]
s = j["summary"]
text = open(sys.argv[3]).read()
fio = json.loads(text[text.index("{"):]) if "{" in text else None
if fio:
    job = fio["jobs"][0]
    w = job["write"]
    clat_max = w["clat_ns"]["max"] / 1e6
    p99 = w["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6
    iops = w["iops"]
    err = job.get("error", 0)
else:
    clat_max = p99 = iops = float("nan")
    err = "?"
if s.get("downtime_ms") != d["downtime_ms"] or s.get("bytes_sent") != d["bytes_sent"]:
    sys.exit(f"the mirror job {j.get('id')} is not the one of this migration: {s} vs {d}")
sw = s.get("switched_to_write_blocking_after_pass")
# Source read-only (the mirror job ends right after releasing the writes) -> destination live.
done = stamp(sys.argv[4], r"job\{id=%s .*job succeeded" % re.escape(j["id"]))
live = stamp(sys.argv[5], r"incoming migration activated")
gap = f"{(live - done).total_seconds() * 1000:.1f}" if done and live else ""
print(f'{d["downtime_ms"]},{s.get("drain_ms", "")},{d["bytes_sent"]},{d["initial_dirty_bytes"]},{d["passes"]},'
      f'{"" if sw is None else sw},{d["mirror_ms"]},{m["duration_ms"]},{clat_max:.3f},{p99:.3f},{iops:.0f},{err},{gap}')
EOF
        ) || die "cannot parse the outputs of cut-over $i (in $out-*)"
        discard_dir "$dst"
        echo "$i,$row,$(cut -d' ' -f1 /proc/loadavg)" >>"$csv"
        log "  cut-over $i/$CUTOVERS: downtime/drain ms,sent,seeded,passes,switched,mirror ms,migrate ms,fio max lat ms,p99,iops,err,gap ms = $row"
    done
    stop_agent "$src"
    discard_dir "$src"
    remove_rbd_image "$img"
}

# --- report --------------------------------------------------------------------------------

header() {
    echo "# Migration benchmark: incremental vs full mirror, cut-over downtime, stream vs rbd bench and rbd export"
    echo
    echo "- command: \`$ORIG_CMDLINE\` (ROUNDS=$ROUNDS SIZE=$SIZE DIRTY=\"$DIRTY\" CUTOVERS=$CUTOVERS DT_SIZE=$DT_SIZE DT_WARMUP=$DT_WARMUP DT_QD=$DT_QD STREAM=$STREAM SEED=$SEED IMAGES_PARENT=$IMAGES_PARENT DEST_DIR=$DEST_DIR WORK_PARENT=$WORK_PARENT)"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '$1 == "MemTotal:" {printf "%.1f GiB RAM", $2 / 1048576}' /proc/meminfo), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rbdsync: $("$BIN" --version 2>/dev/null | head -n1) ($RBDSYNC, $(date -r "$RBDSYNC" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$BIN" | cut -c1-16); git $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_DIR" status --porcelain -- agent proto 2>/dev/null | grep -q . && echo ', agent/ or proto/ differ from HEAD'))"
    echo "- ceph: $(rbd --version | head -n1); a throw-away cluster per part (deploy/dev/ceph-cluster.sh: 1 mon + 1 memstore OSD, size-1 pools, 127.0.0.1); fio: $(fio --version)"
    echo "- agents: source and destination are separate processes (own state dirs, NBD on 127.0.0.1:0 and a Unix socket); the mirror goes over TCP loopback; \`file:\` images of part 1 on $IMAGES_PARENT ($(stat -f -c %T "$IMAGES_PARENT")), part 1's destinations and \`rbd export\` files on ${DEST_DIR:-$IMAGES_PARENT} ($(stat -f -c %T "$(dest_fs)")), of the cut-overs on $WORK_PARENT ($(stat -f -c %T "$WORK_PARENT"))"
}

report_part1() {
    "$PY" - "$1" <<'EOF'
import csv, os, statistics, sys
med = statistics.median
rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    sys.exit(0)
levels = []
for r in rows:
    if r["dirty_pct"] not in levels:
        levels.append(r["dirty_pct"])
MiB = 1048576
f = lambda r, k: float(r[k])
print("### Incremental migrate vs full mirror (bytes sent and time)")
print()
print("| dirty (target) | dirty (bitmap) | incremental sent | full sent | sent ratio inc/full | ratio / dirty fraction "
      "| incremental mirror | full mirror | time ratio | migrate wall (all steps) | full wall (prepare+mirror+cut-over) "
      "| downtime inc / full | ratio per round |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for lv in levels:
    rs = [r for r in rows if r["dirty_pct"] == lv]
    dfrac = med([f(r, "dirty_bytes") / f(r, "size") for r in rs])
    inc_s = med([f(r, "inc_sent") for r in rs]); full_s = med([f(r, "full_sent") for r in rs])
    ratios = [f(r, "inc_sent") / f(r, "full_sent") for r in rs]
    ratio = med(ratios)
    inc_t = med([f(r, "inc_mirror_ms") for r in rs]) / 1000; full_t = med([f(r, "full_mirror_ms") for r in rs]) / 1000
    inc_w = med([f(r, "inc_wall_s") for r in rs]); full_w = med([f(r, "full_wall_s") for r in rs])
    inc_d = med([f(r, "inc_downtime_ms") for r in rs]); full_d = med([f(r, "full_downtime_ms") for r in rs])
    print(f"| {lv}% | {dfrac * 100:.2f}% | {inc_s / MiB:,.1f} MiB | {full_s / MiB:,.1f} MiB | {ratio:.4f} | {ratio / dfrac:.2f} "
          f"| {inc_t:.2f} s | {full_t:.2f} s | {inc_t / full_t:.3f} | {inc_w:.2f} s | {full_w:.2f} s "
          f"| {inc_d:.0f} / {full_d:.0f} ms | {', '.join(f'{x:.4f}' for x in ratios)} |")
print()
print("- sent = the mirror job's `bytes_sent` (summary); mirror = its `duration_ms` (mirror start to end of cut-over, "
      "including the client's polling: `migrate` polls every 100 ms, the full side runs `mirror --wait` (200 ms polls) "
      "then `job complete`); wall = the whole command(s) as timed by the script (migrate: chain check, prepare, mirror, "
      "cut-over, fence, activation). Goal: sent ratio ~= dirty fraction (ratio / dirty fraction ~= 1).")
print("- downtime inc / full: the mirrors' `downtime_ms` without any guest load: almost all of it is the destination's "
      "flush at the cut-over (fdatasync of its `file:` image, on disk unless IMAGES_PARENT is tmpfs), which grows with "
      "the bytes written since the last writeback.")
if any(r["stream_s"] not in ("-", "") for r in rows):
    print()
    print("### Stream on the destination vs rbd bench sequential read (4M) and rbd export + fdatasync")
    print()
    print("| dirty | stream copied | stream time | stream MiB/s | rbd export + fdatasync MiB/s | stream / rbd export "
          "| per round (vs export) | rbd bench 4M, 16 threads | stream / rbd bench 16 | rbd bench 4M, 1 thread "
          "| stream / rbd bench 1 | per round (vs 16) | rbd bench 64K, 1 thread | rbd export time (of which fdatasync) |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|")
    misses = []
    size = f(rows[0], "size")
    for lv in levels:
        rs = [r for r in rows if r["dirty_pct"] == lv and r["stream_s"] not in ("-", "")]
        if not rs:
            continue
        rate = lambda r: f(r, "stream_copied") / MiB / f(r, "stream_s")
        s = med([rate(r) for r in rs]); b16 = med([f(r, "rbd_bench16") for r in rs]); b1 = med([f(r, "rbd_bench1") for r in rs])
        per = [rate(r) / f(r, "rbd_bench16") for r in rs]
        if s / b16 < 0.9:
            misses.append(f"{lv}% ({s / b16:.2f}x)")
        xs = [r for r in rs if r.get("rbd_export_s") not in (None, "-", "")]
        if xs:
            xrate = lambda r: f(r, "size") / MiB / f(r, "rbd_export_s")
            x = med([xrate(r) for r in xs])
            xcells = (f"{x:,.0f} | {s / x:.2f} | {', '.join(f'{rate(r) / xrate(r):.2f}' for r in xs)}",
                      f"{med([f(r, 'rbd_export_s') for r in xs]):.2f} s ({med([f(r, 'rbd_export_sync_s') for r in xs]):.2f} s)")
        else:
            xcells = ("- | - | -", "-")
        print(f"| {lv}% | {med([f(r, 'stream_copied') for r in rs]) / MiB:,.0f} MiB | {med([f(r, 'stream_s') for r in rs]):.2f} s "
              f"| {s:,.0f} | {xcells[0]} | {b16:,.0f} | {s / b16:.2f} | {b1:,.0f} | {s / b1:.2f} | {', '.join(f'{x:.2f}' for x in per)} "
              f"| {med([f(r, 'rbd_bench64k_1') for r in rs]):,.0f} | {xcells[1]} |")
    print()
    print("- stream: the stream job `migrate` started on the destination (4 MiB chunks, 8 in flight, one parent read "
          "each, from the RBD backup into the `file:` image, then detach), timed by the job itself (summary.duration_ms: from its start to the parent detached); "
          "MiB/s = `bytes_copied` (the regions not yet written by the mirror) / time. rbd bench: "
          "`rbd bench --io-type read --io-pattern seq --io-size 4M --io-total SIZE` on the backup image right after; "
          "the 64K column (64 KiB reads, one at a time, at most 1 GiB) is the copy-up pattern of an earlier "
          "version of the stream (one synchronous parent read per 64 KiB granule), kept for comparison only.")
    print(f"- rbd export (the fair peer: it reads the backup and writes a local file as the stream does): "
          f"`rbd export POOL/IMAGE@SNAP FILE` of the stream's parent snapshot ({size / MiB:,.0f} MiB, rbd's default "
          "`rbd_concurrent_management_ops` reads in flight) to a file on the destination's filesystem, then "
          "`sync --data FILE` (fdatasync), timed together from a settled filesystem (`sync -f` before), after the "
          "destination agent is stopped and its image deleted; MiB/s = image size / that time. Both figures include "
          "making the data durable: the stream's job concludes after its detach, which fdatasyncs the image (and "
          "writes the owned map, the sidecar and the hold release, small); rbd bench includes no write at all.")
    print(f"- goal (stream >= 0.9x rbd bench sequential read, rbd bench's default 16 threads): "
          + (f"**NOT met** on {', '.join(misses)}" if misses else "met")
          + "; stream / rbd export is the like-for-like ratio (no goal set here).")
    known = lambda r, *ks: all(r.get(k) not in (None, "", "-") for k in ks)
    cpu_rows = []
    for lv in levels:
        rs = [r for r in rows if r["dirty_pct"] == lv and known(r, "stream_cpu_s", "stream_osd_s", "rbd_bench16_cpu_s",
                                                                 "rbd_bench16_osd_s", "rbd_export_cpu_s", "rbd_export_osd_s")]
        if rs:
            cpu_rows.append((lv, rs))
    if cpu_rows:
        print()
        print("CPU per MiB moved (milliseconds; the process doing the work, user + system, and the OSD meanwhile) and "
              f"the CPUs kept busy (CPU seconds / seconds; this machine has {os.cpu_count()}). The stream's process is "
              "the destination agent (its reads from librbd and its writes into the destination file); rbd export's is "
              "rbd plus `sync`; rbd bench only reads:")
        print()
        print("| dirty | stream: agent + OSD | rbd export: rbd + OSD | rbd bench 16: rbd + OSD | CPUs busy: stream / "
              "export / bench | for 0.9x rbd bench the agent may spend at most | agent spent | rbd export's process |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for lv, rs in cpu_rows:
            ms = lambda k, mib: med([f(r, k) * 1000 / mib(r) for r in rs])
            moved = lambda r: f(r, "stream_copied") / MiB
            whole = lambda r: f(r, "size") / MiB
            s_agent, s_osd = ms("stream_cpu_s", moved), ms("stream_osd_s", moved)
            x_rbd, x_osd = ms("rbd_export_cpu_s", whole), ms("rbd_export_osd_s", whole)
            b_rbd, b_osd = ms("rbd_bench16_cpu_s", whole), ms("rbd_bench16_osd_s", whole)
            busy_s = med([(f(r, "stream_cpu_s") + f(r, "stream_osd_s")) / f(r, "stream_s") for r in rs])
            busy_x = med([(f(r, "rbd_export_cpu_s") + f(r, "rbd_export_osd_s")) / f(r, "rbd_export_s") for r in rs])
            busy_b = med([(f(r, "rbd_bench16_cpu_s") + f(r, "rbd_bench16_osd_s")) / (whole(r) / f(r, "rbd_bench16"))
                          for r in rs])
            budget = (b_rbd + b_osd) / 0.9 - s_osd
            print(f"| {lv}% | {s_agent:.2f} + {s_osd:.2f} | {x_rbd:.2f} + {x_osd:.2f} | {b_rbd:.2f} + {b_osd:.2f} "
                  f"| {busy_s:.2f} / {busy_x:.2f} / {busy_b:.2f} | {budget:.2f} | {s_agent:.2f} | {x_rbd:.2f} |")
        print()
        print("- the budget column models a CPU-bound machine (the same CPUs busy on both sides, so throughput = "
              "CPUs / CPU per MiB): rbd bench's CPU per MiB / 0.9, minus the OSD's CPU per MiB during the stream. "
              "When the stream keeps fewer CPUs busy than rbd bench, it waits on something other than CPU.")
print()
loads = [float(r["load1"]) for r in rows]
print(f"- {len(set(r['round'] for r in rows))} round(s); each cell the median. 1-minute load average after each level: "
      f"min {min(loads):.2f}, median {med(loads):.2f}, max {max(loads):.2f}.")
EOF
}

report_part2() {
    "$PY" - "$1" <<'EOF'
import csv, statistics, sys
med = statistics.median
rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    sys.exit(0)
d = sorted(float(r["downtime_ms"]) for r in rows)
dr = [float(r["drain_ms"]) for r in rows if r["drain_ms"]]
lat = [float(r["fio_max_lat_ms"]) for r in rows if r["fio_max_lat_ms"] != "nan"]
p99 = [float(r["fio_p99_ms"]) for r in rows if r["fio_p99_ms"] != "nan"]
iops = [float(r["fio_iops"]) for r in rows if r["fio_iops"] != "nan"]
sent = [float(r["bytes_sent"]) / 1048576 for r in rows]
seeded = [float(r["initial_dirty"]) / 1048576 for r in rows]
mig = [float(r["migrate_ms"]) for r in rows]
switched = sum(1 for r in rows if r["switched_after_pass"])
p90 = d[min(len(d) - 1, int(round(0.9 * (len(d) - 1))))]
print(f"### Cut-over downtime under 4K random writes ({len(rows)} cut-overs)")
print()
print("| | median | p90 | max | min |")
print("|---|---:|---:|---:|---:|")
print(f"| downtime (mirror summary `downtime_ms`) | {med(d):.0f} ms | {p90:.0f} ms | {max(d):.0f} ms | {min(d):.0f} ms |")
if dr:
    print(f"| of which drain (wait for in-flight writes) | {med(dr):.0f} ms | | {max(dr):.0f} ms | {min(dr):.0f} ms |")
if lat:
    print(f"| fio max latency of acknowledged writes per run | {med(lat):.0f} ms | | {max(lat):.0f} ms | {min(lat):.0f} ms |")
    print(f"| fio p99 write latency per run | {med(p99):.1f} ms | | {max(p99):.1f} ms | {min(p99):.1f} ms |")
    print(f"| fio write IOPS (whole run) | {med(iops):,.0f} | | {max(iops):,.0f} | {min(iops):,.0f} |")
gap = [float(r["gap_ms"]) for r in rows if r["gap_ms"]]
if gap:
    both = [float(r["downtime_ms"]) + float(r["gap_ms"]) for r in rows if r["gap_ms"]]
    print(f"| source read-only -> destination live (agents' logs) | {med(gap):.0f} ms | | {max(gap):.0f} ms | {min(gap):.0f} ms |")
    print(f"| downtime + that gap (no writable copy) | {med(both):.0f} ms | | {max(both):.0f} ms | {min(both):.0f} ms |")
print(f"| mirror seeded with | {med(seeded):.1f} MiB | | {max(seeded):.1f} MiB | {min(seeded):.1f} MiB |")
print(f"| bytes sent | {med(sent):.1f} MiB | | {max(sent):.1f} MiB | {min(sent):.1f} MiB |")
print(f"| migrate duration | {med(mig):.0f} ms | | {max(mig):.0f} ms | {min(mig):.0f} ms |")
print()
goal = "met" if med(d) <= 50 else "**NOT met**"
print(f"- goal (median downtime <= 50 ms on loopback): {goal} (median {med(d):.0f} ms, max {max(d):.0f} ms)")
print(f"- mirrors that switched themselves to write-blocking before the cut-over: {switched} of {len(rows)} "
      "(`migrate` switches every mirror to write-blocking just before completing it anyway)")
print("- fio's latencies cover its whole run (warm-up, background and write-blocking mirror phases); the writes held "
      "at the cut-over end with EPERM (the source is read-only on release) and are not in fio's latency statistics, "
      "so fio's maximum is no measure of the cut-over; `downtime_ms` is (hold -> drain -> copy the rest -> flush "
      "the destination -> read-only). After it, `migrate` fences the source and activates the destination: the "
      "'read-only -> live' row is that step, from the timestamps of the source's `job succeeded` and the "
      "destination's `incoming migration activated` log lines (the guest's own switch-over is not included).")
print(f"- every downtime (ms, in order): {', '.join(r['downtime_ms'] for r in rows)}")
loads = [float(r["load1"]) for r in rows]
print(f"- 1-minute load average after each cut-over: min {min(loads):.2f}, median {med(loads):.2f}, max {max(loads):.2f}.")
EOF
}

# --- main ----------------------------------------------------------------------------------

main() {
    check_params
    check_tools
    check_memory
    ensure_built

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d "$WORK_PARENT/rbdsync-migrate-bench.XXXXXX")
    BIG=$(mktemp -d "$IMAGES_PARENT/rbdsync-migrate-bench-images.XXXXXX")
    DEST=$BIG
    if [[ -n $DEST_DIR ]]; then
        if [[ ! -d $DEST_DIR ]]; then
            mkdir "$DEST_DIR" || die "cannot create DEST_DIR=$DEST_DIR"
            DEST_MADE=1
        fi
        DEST=$(mktemp -d "$DEST_DIR/rbdsync-migrate-bench-dest.XXXXXX")
    fi
    mkdir -p "$WORK/out" "$RESULTS_DIR"
    BIN="$WORK/agent-under-test"
    cp "$RBDSYNC" "$BIN"

    local hdr
    hdr=$(header)
    echo "$hdr"
    echo

    local csv1="$WORK/part1.csv" csv2="$WORK/cutover.csv" round
    echo "round,dirty_pct,dirty_bytes,size,full_sent,full_mirror_ms,full_downtime_ms,full_wall_s,inc_sent,inc_mirror_ms,inc_downtime_ms,inc_wall_s,inc_seeded,inc_passes,stream_copied,stream_s,stream_total,rbd_bench1,rbd_bench64k_1,rbd_export_s,rbd_export_sync_s,rbd_export_cpu_s,rbd_export_osd_s,rbd_bench16,rbd_bench16_cpu_s,rbd_bench16_osd_s,stream_cpu_s,stream_osd_s,load1" >"$csv1"
    echo "cutover,downtime_ms,drain_ms,bytes_sent,initial_dirty,passes,switched_after_pass,mirror_ms,migrate_ms,fio_max_lat_ms,fio_p99_ms,fio_iops,fio_error,gap_ms,load1" >"$csv2"
    local rss1="-" rss2="-" start part1_s="-" part2_s="-"
    if ((ROUNDS > 0)); then
        start=$SECONDS
        start_cluster
        for ((round = 1; round <= ROUNDS; round++)); do
            run_round "$round" "$csv1"
        done
        rss1=$(osd_rss)
        stop_cluster
        part1_s=$((SECONDS - start))
    fi
    if ((CUTOVERS > 0)); then
        start=$SECONDS
        start_cluster
        run_cutovers "$csv2"
        rss2=$(osd_rss)
        stop_cluster
        part2_s=$((SECONDS - start))
    fi

    local t1="" t2=""
    ((ROUNDS == 0)) || t1=$(report_part1 "$csv1")
    ((CUTOVERS == 0)) || t2=$(report_part2 "$csv2")
    local md="$RESULTS_DIR/migrate-$STAMP.md" foot
    foot="- load average at end: $(cut -d' ' -f1-3 /proc/loadavg); part 1 took $part1_s s, part 2 $part2_s s; OSD resident memory at the end of part 1: $rss1 MiB, of part 2: $rss2 MiB"
    {
        echo "$hdr"
        echo "$foot"
        echo
        [[ -z $t1 ]] || { echo "$t1"; echo; }
        [[ -z $t2 ]] || echo "$t2"
    } >"$md"
    cp "$csv1" "$RESULTS_DIR/migrate-$STAMP.csv"
    cp "$csv2" "$RESULTS_DIR/migrate-$STAMP-cutover.csv"
    echo "$foot"
    echo
    [[ -z $t1 ]] || { echo "$t1"; echo; }
    [[ -z $t2 ]] || { echo "$t2"; echo; }
    echo "Written: $md (raw rows: migrate-$STAMP.csv, migrate-$STAMP-cutover.csv)"
}

main "$@"
