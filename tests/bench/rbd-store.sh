#!/usr/bin/env bash
# RBD store benchmark: rbdsync's rbd: image path against `rbd bench`, on a throw-away Ceph cluster
# (deploy/dev/ceph-cluster.sh: one mon + one memstore OSD on 127.0.0.1), all in the same run.
#
# Sides (each round runs every side once, order rotated per round; each side gets a fresh
# $IMAGE_SIZE image, created with `rbd create` and removed afterwards):
#   rbd-bench  `rbd bench` (librbd aio from one thread, --io-threads 16 in flight): the reference the
#              issue names, with librbd's defaults: its cache on, which in Ceph 16 (policy
#              writearound) completes a write before the OSD has it (up to rbd_cache_max_dirty)
#   rbd-bench-nocache  the same with --rbd-cache=false: librbd set up as the agent sets it up (as QEMU
#              cache=none does), so a write completes when the OSD acknowledges it: like for like
#   fio-rbd    fio's rbd engine (librbd's C API, as the agent uses it; fio's own buffers, whose
#              contents fio changes between writes) at iodepth 16, with librbd set up as the agent
#              sets it up (no cache, zero-copy aio writes): the same client program as the nbd side
#              without the NBD hop, and a real-data librbd client beside rbd bench, which writes
#              one unchanging buffer (its CRC computed once) and reads into librbd's own buffers
#   nbd        the agent serving the image (`image: rbd:rbd/IMG`) over its NBD Unix socket, driven
#              by fio's nbd engine at iodepth 16: the product path (NBD server + store)
#   store      agent/examples/rbd_bench.rs: 16 requests in flight on the agent's RbdStore (through
#              agent::store::Stores) directly, on its aio data path as the NBD server uses it: the store
#              alone, to tell store cost from server cost
# Workloads per side, in this order (the first fills the image, so reads read data):
#   4M sequential write, 4M sequential read   ($TOTAL_4M each, reported in MiB/s)
#   4K random write, 4K random read            ($TOTAL_4K each, reported in IOPS)
# The table holds medians over the rounds and the ratios nbd/rbd-bench and store/rbd-bench; the
# goal is >= 0.9x on every row. It is printed and written to tests/bench/results/rbd-store.md.
#
# Usage: tests/bench/rbd-store.sh
# Environment:
#   ROUNDS=5           rounds
#   IMAGE_SIZE=256MiB  image size (memstore keeps data in RAM: keep it small)
#   TOTAL_4M=1GiB      bytes moved per 4M run (wraps over the image)
#   TOTAL_4K=128MiB    bytes moved per 4K run
#   QD=16              requests in flight (rbd bench --io-threads, fio --iodepth, example tasks)
#   SIDES="rbd-bench rbd-bench-nocache fio-rbd nbd store"   which sides (ratios need a peer side:
#                      rbd-bench, rbd-bench-nocache or fio-rbd)
#   CEPH_CONF=...      use this running cluster (pool rbd, client.admin) instead of starting one
#   CEPH_MEMSTORE_BYTES  passed to ceph-cluster.sh (its default: 8 GiB, a cap, not an allocation)
#   RBDSYNC=...        agent binary (default target/release/rbdsync, built if missing)
#   RBD_BENCH=...      example binary (default target/release/examples/rbd_bench, built if missing)
#   KEEP=1             keep the work directory (logs, configs, outputs; cluster logs too)
# Needs: ceph (mon, osd, rbd CLI), fio with the nbd and rbd engines, python3.
# Default run: ~1 min of cluster + build checks, 5 rounds x 5 sides x ~8 s = about 4-5 minutes.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-5}
IMAGE_SIZE=${IMAGE_SIZE:-256MiB}
TOTAL_4M=${TOTAL_4M:-1GiB}
TOTAL_4K=${TOTAL_4K:-128MiB}
QD=${QD:-16}
SIDES=${SIDES:-"rbd-bench rbd-bench-nocache fio-rbd nbd store"}
KEEP=${KEEP:-0}
POOL=rbd
EXPORT=bench/disk0
WORKLOADS=(write4m read4m write4k read4k)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
RBDSYNC=${RBDSYNC:-$REPO_DIR/target/release/rbdsync}
RBD_BENCH=${RBD_BENCH:-$REPO_DIR/target/release/examples/rbd_bench}
CLUSTER_SH="$REPO_DIR/deploy/dev/ceph-cluster.sh"

WORK=""
CEPH_DIR=""      # set when this script started the cluster (and must stop it)
CONF=${CEPH_CONF:-}
AGENT_BIN=""     # copies: neither name holds "rbdsync" (another test's pkill -f must miss them)
STORE_BIN=""
AGENT_PID=""
IMAGE=""         # the image that exists right now (removed on exit)
ORIG_CMDLINE="$0${*:+ $*}"

die() {
    if [[ -z $WORK || (-d $WORK && ! -e $WORK/interrupted) ]]; then
        echo "rbd-store.sh: error: $*" >&2
    fi
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

rbd_() {
    timeout 60 rbd -c "$CONF" "$@"
}

# --- cleanup -------------------------------------------------------------------------------

stop_agent() {
    local pid=$AGENT_PID
    AGENT_PID=""
    stop_pid "$pid" agent
}

remove_image() {
    [[ -n $IMAGE ]] || return 0
    rbd_ rm --no-progress "$POOL/$IMAGE" >/dev/null 2>&1 ||
        echo "rbd-store.sh: could not remove image $POOL/$IMAGE" >&2
    IMAGE=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -gt 128 && -n $WORK && -d $WORK ]]; then
        : >"$WORK/interrupted"
    fi
    stop_agent
    [[ -z $CONF ]] || remove_image
    if [[ -n $CEPH_DIR ]]; then
        "$CLUSTER_SH" down "$CEPH_DIR" >/dev/null 2>&1 || echo "rbd-store.sh: stopping the cluster in $CEPH_DIR failed" >&2
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            rm -f "$WORK/agent-under-test" "$WORK/store-under-test"
            echo "rbd-store.sh: work directory kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# --- checks and setup ----------------------------------------------------------------------



check_params() {
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
    [[ $QD =~ ^[1-9][0-9]*$ ]] || die "QD must be a positive integer (got '$QD')"
    IMAGE_B=$(bytes "$IMAGE_SIZE" IMAGE_SIZE)
    TOTAL_4M_B=$(bytes "$TOTAL_4M" TOTAL_4M)
    TOTAL_4K_B=$(bytes "$TOTAL_4K" TOTAL_4K)
    ((IMAGE_B >= 64 << 20 && IMAGE_B % (4 << 20) == 0)) || die "IMAGE_SIZE must be a multiple of 4 MiB, at least 64 MiB"
    ((TOTAL_4M_B >= 4 << 20 && TOTAL_4K_B >= 4096)) || die "TOTAL_4M / TOTAL_4K too small"
    local s
    for s in $SIDES; do
        case $s in
            rbd-bench | rbd-bench-nocache | fio-rbd | nbd | store) ;;
            *) die "SIDES: unknown side '$s' (known: rbd-bench rbd-bench-nocache fio-rbd nbd store)" ;;
        esac
    done
}

check_tools() {
    need rbd ceph-common
    need fio fio
    need python3 python3
    need timeout coreutils
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd failed)"
    fio --enghelp=rbd >/dev/null 2>&1 || die "this fio has no rbd engine (fio --enghelp=rbd failed)"
    if [[ -z $CONF ]]; then
        need ceph-mon ceph-mon
        need ceph-osd ceph-osd
        [[ -x $CLUSTER_SH ]] || die "$CLUSTER_SH missing"
    fi
}

# ensure_built PATH DEFAULT CARGO_ARGS...: builds with cargo if PATH is the default and missing.
ensure_built() {
    local path=$1 default=$2
    shift 2
    if [[ ! -x $path ]]; then
        [[ $path == "$default" ]] || die "$path is not an executable file"
        need cargo cargo
        log "building: cargo build $*"
        (cd "$REPO_DIR" && cargo build "$@") >&2
        [[ -x $path ]] || die "cargo build did not produce $path"
    fi
}

start_cluster() {
    if [[ -n $CONF ]]; then
        [[ -r $CONF ]] || die "CEPH_CONF=$CONF is not readable"
        log "using the running cluster of $CONF"
    else
        CEPH_DIR="$WORK/ceph"
        log "starting a throw-away cluster in $CEPH_DIR"
        "$CLUSTER_SH" up "$CEPH_DIR" >"$WORK/ceph-up.log" 2>&1 ||
            die "ceph-cluster.sh up failed: $(tail -n 20 "$WORK/ceph-up.log")"
        CONF="$CEPH_DIR/ceph.conf"
    fi
    rbd_ ls "$POOL" >/dev/null || die "'rbd -c $CONF ls $POOL' failed"
}

# Sets OSD_PID: the OSD of the cluster this script started, or of a CEPH_CONF cluster made by
# ceph-cluster.sh (its pid file is under the conf's run_dir); empty when not found.
OSD_PID=""
find_osd() {
    local run="$CEPH_DIR/run"
    [[ -n $CEPH_DIR ]] || run=$(awk -F' *= *' '$1 == "run_dir" {print $2; exit}' "$CONF")
    OSD_PID=$(cat "$run/osd.0.pid" 2>/dev/null) || OSD_PID=""
    [[ $OSD_PID =~ ^[0-9]+$ && -r /proc/$OSD_PID/stat ]] || OSD_PID=""
    [[ -n $OSD_PID ]] || log "OSD process not found: its CPU per operation is not reported"
}

# Prints the OSD's resident memory in MiB (or ? when unknown).
osd_rss() {
    [[ -n $OSD_PID ]] || { echo "?"; return; }
    awk '$1 == "VmRSS:" {printf "%d", $2 / 1024}' "/proc/$OSD_PID/status" 2>/dev/null || echo "?"
}


# --- the sides -----------------------------------------------------------------------------

# workload_args WORKLOAD: sets IO_SIZE (bytes), TOTAL (bytes), PATTERN (seq|rand), DIR (read|write).
workload_args() {
    case $1 in
        write4m) IO_SIZE=$((4 << 20)) TOTAL=$TOTAL_4M_B PATTERN=seq DIR=write ;;
        read4m) IO_SIZE=$((4 << 20)) TOTAL=$TOTAL_4M_B PATTERN=seq DIR=read ;;
        write4k) IO_SIZE=4096 TOTAL=$TOTAL_4K_B PATTERN=rand DIR=write ;;
        read4k) IO_SIZE=4096 TOTAL=$TOTAL_4K_B PATTERN=rand DIR=read ;;
    esac
}

# Each run_* prints "OPS_PER_S CPU_S FIO_CPU_S": operations per second, CPU seconds of the
# process doing the librbd calls (rbd, fio with its rbd engine, the agent, the example) and, for
# nbd, fio's CPU seconds.

# CPU seconds an `rbd bench` process spends outside its IO (start, connect, open, close), set by
# measure_rbd_startup and subtracted from every rbd bench run: the other sides' CPU is measured
# over their IO only.
RBD_STARTUP_CPU=0

# startup_probe_rbd OUT: one rbd bench op; its CPU to OUT.time.
startup_probe_rbd() {
    local TIMEFORMAT='%U %S'
    { time rbd_ bench --io-type read --io-size 4096 --io-threads 1 --io-total 4096 "$POOL/$IMAGE" \
        >"$1" 2>&1; } 2>"$1.time" || die "rbd bench (startup probe) failed"
}

# startup_probe_fio OUT: one fio rbd-engine op; its CPU to OUT.time.
startup_probe_fio() {
    fio_rbd read4k "$1" --size=64M --io_size=4096
}

# median_startup_cpu PROBE: sets STARTUP_CPU to the median CPU seconds of three runs of PROBE on a
# fresh 64 MiB image.
STARTUP_CPU=0
median_startup_cpu() {
    local k
    local -a runs=()
    IMAGE="bench-$$-$1"
    rbd_ create --size 64M "$POOL/$IMAGE" >/dev/null || die "rbd create $POOL/$IMAGE failed"
    for k in 1 2 3; do
        "$1" "$WORK/out/$1-$k"
        runs+=("$(awk '{print $1 + $2}' "$WORK/out/$1-$k.time")")
    done
    remove_image
    STARTUP_CPU=$(printf '%s\n' "${runs[@]}" | sort -g | sed -n 2p)
}

measure_rbd_startup() {
    median_startup_cpu startup_probe_rbd
    RBD_STARTUP_CPU=$STARTUP_CPU
    log "rbd bench start-up CPU (median of 3 one-op runs): ${RBD_STARTUP_CPU}s, subtracted from every rbd bench run"
}

# run_rbd_bench WORKLOAD OUT [RBD_OPTION...]
run_rbd_bench() {
    local workload=$1 out=$2
    shift 2
    workload_args "$workload"
    local TIMEFORMAT='%U %S'
    { time timeout 300 rbd -c "$CONF" "$@" bench --io-type "$DIR" --io-size "$IO_SIZE" --io-threads "$QD" \
        --io-total "$TOTAL" --io-pattern "$PATTERN" "$POOL/$IMAGE" >"$out" 2>&1; } 2>"$out.time" ||
        die "rbd bench $workload failed: $(tail -n 5 "$out")"
    python3 - "$out" "$out.time" "$RBD_STARTUP_CPU" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
startup = float(sys.argv[3])
m = re.search(r"elapsed:\s*\S+\s+ops:\s*(\d+)\s+ops/sec:\s*([0-9.]+)", text)
if not m:
    sys.exit(f"no summary line in {sys.argv[1]}")
user, sys_ = map(float, open(sys.argv[2]).read().split()[-2:])
print(f"{float(m.group(2)):.1f} {max(user + sys_ - startup, 0):.3f} 0")
EOF
}

run_store() {
    local workload=$1 out=$2
    workload_args "$workload"
    timeout 300 "$STORE_BIN" --conf "$CONF" --image "$POOL/$IMAGE" --io-type "$DIR" --io-size "$IO_SIZE" \
        --io-threads "$QD" --io-total "$TOTAL" --io-pattern "$PATTERN" >"$out" 2>&1 ||
        die "rbd_bench example $workload failed: $(tail -n 5 "$out")"
    awk '$1 == "ops" {printf "%s %.3f 0\n", $6, $10 + $12}' "$out"
}

# The configuration fio's rbd engine reads (through $CEPH_CONF): the cluster's, plus librbd set up
# as the agent sets it up (agent/src/store/rbd/rados.rs).
fio_rbd_conf() {
    local conf="$WORK/fio-rbd.conf"
    if [[ ! -s $conf ]]; then
        {
            cat "$CONF"
            printf '\n[client]\nrbd_cache = false\nrbd_disable_zero_copy_writes = false\n'
        } >"$conf"
    fi
    echo "$conf"
}

# fio_result JSON DIRECTION PROCESS_CPU_S: prints "OPS_PER_S PROCESS_CPU_S FIO_THREAD_CPU_S".
fio_result() {
    python3 - "$@" <<'EOF'
import json, sys
path, direction, process_cpu = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']} in {path}")
d = job[direction]
if d["io_bytes"] == 0:
    sys.exit(f"fio moved no data in {path}")
fio_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
print(f"{d['iops']:.1f} {process_cpu} {fio_cpu:.3f}")
EOF
}

fio_rw() {
    case $1 in
        write4m) echo write ;;
        read4m) echo read ;;
        write4k) echo randwrite ;;
        read4k) echo randread ;;
    esac
}

# fio_rbd WORKLOAD OUT [FIO_OPTION...]: runs fio's rbd engine on $POOL/$IMAGE; its user and system
# CPU seconds (the whole process: fio's thread and librbd's) go to OUT.time.
fio_rbd() {
    local workload=$1 out=$2 conf
    shift 2
    workload_args "$workload"
    conf=$(fio_rbd_conf)
    local TIMEFORMAT='%U %S'
    # From $WORK: fio may lay out a local file named after the job.
    { time env -C "$WORK" CEPH_CONF="$conf" timeout 300 fio --name="$workload" --ioengine=rbd --clientname=admin --pool="$POOL" \
        --rbdname="$IMAGE" --rw="$(fio_rw "$workload")" --bs="$IO_SIZE" --iodepth="$QD" --numjobs=1 \
        --size="$IMAGE_B" --io_size="$TOTAL" --norandommap --randrepeat=0 --output-format=json "$@" \
        --output="$out" >"$out.stdout" 2>&1; } 2>"$out.time" ||
        die "fio (rbd engine) $workload failed: $(tail -n 5 "$out.stdout")"
}

# CPU seconds a fio rbd-engine process spends outside its IO (start, connect, open, close): the
# median of three one-op runs, subtracted from every fio-rbd run, as for rbd bench.
FIO_RBD_STARTUP_CPU=0

measure_fio_rbd_startup() {
    median_startup_cpu startup_probe_fio
    FIO_RBD_STARTUP_CPU=$STARTUP_CPU
    log "fio rbd-engine start-up CPU (median of 3 one-op runs): ${FIO_RBD_STARTUP_CPU}s, subtracted from every fio-rbd run"
}

# run_fio_rbd WORKLOAD OUT: the fio-rbd side; CPU as for rbd bench (start-up subtracted).
run_fio_rbd() {
    local workload=$1 out=$2 result
    fio_rbd "$workload" "$out"
    result=$(fio_result "$out" "$DIR" "$(awk -v s="$FIO_RBD_STARTUP_CPU" '{c = $1 + $2 - s; if (c < 0) c = 0; printf "%.3f", c}' "$out.time")") ||
        return 1
    echo "${result% *} 0"
}

# start_agent: serves $POOL/$IMAGE as $EXPORT on $WORK/agent/nbd.sock; sets AGENT_PID, URI.
start_agent() {
    local dir="$WORK/agent" i
    rm -rf "$dir"
    mkdir -p "$dir/vms.d" "$dir/state"
    {
        agent_yaml "$dir"
        printf 'ceph:\n  conf: %s\n  client: admin\n' "$CONF"
    } >"$dir/agent.yaml"
    cat >"$dir/vms.d/bench.yaml" <<EOF
name: bench
disks:
  - name: disk0
    image: rbd:$POOL/$IMAGE
    size: $IMAGE_B
    bitmaps: []
EOF
    "$AGENT_BIN" agent --config "$dir/agent.yaml" >>"$WORK/agent.log" 2>&1 &
    AGENT_PID=$!
    for ((i = 0; i < 600; i++)); do
        [[ -s $dir/state/agent.json && -S $dir/nbd.sock ]] && break
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited during startup: $(tail -n 5 "$WORK/agent.log")"
        sleep 0.05
    done
    [[ -s $dir/state/agent.json && -S $dir/nbd.sock ]] || die "agent not serving within 30 s; see $WORK/agent.log"
    URI="nbd+unix:///$EXPORT?socket=$dir/nbd.sock"
}

agent_ticks() {
    local ticks
    ticks=$(proc_ticks "$AGENT_PID")
    [[ -n $ticks ]] || die "agent (pid $AGENT_PID) is gone"
    echo "$ticks"
}

run_nbd() {
    local workload=$1 out=$2 ticks0 ticks1
    workload_args "$workload"
    ticks0=$(agent_ticks)
    if ! timeout 300 fio --name="$workload" --ioengine=nbd --uri="$URI" --rw="$(fio_rw "$workload")" --bs="$IO_SIZE" \
        --iodepth="$QD" --numjobs=1 --size="$IMAGE_B" --io_size="$TOTAL" --norandommap --randrepeat=0 \
        --output-format=json --output="$out" >"$out.stdout" 2>&1; then
        die "fio $workload failed: $(tail -n 5 "$out.stdout"); agent log: $(tail -n 3 "$WORK/agent.log")"
    fi
    ticks1=$(agent_ticks)
    fio_result "$out" "$DIR" "$(ticks_s "$((ticks1 - ticks0))")"
}

# run_side SIDE ROUND CSV: fresh image, the four workloads, image removed.
run_side() {
    local side=$1 round=$2 csv=$3 workload ops cpu fio_cpu load osd0 osd1 osd_cpu
    IMAGE="bench-$$-r$round-$side"
    rbd_ create --size "$((IMAGE_B >> 20))M" "$POOL/$IMAGE" >/dev/null || die "rbd create $POOL/$IMAGE failed"
    [[ $side == nbd ]] && start_agent
    for workload in "${WORKLOADS[@]}"; do
        local out="$WORK/out/r$round-$side-$workload"
        osd0=$(proc_ticks "$OSD_PID")
        case $side in
            rbd-bench) read -r ops cpu fio_cpu < <(run_rbd_bench "$workload" "$out") || true ;;
            rbd-bench-nocache) read -r ops cpu fio_cpu < <(run_rbd_bench "$workload" "$out" --rbd-cache=false) || true ;;
            fio-rbd) read -r ops cpu fio_cpu < <(run_fio_rbd "$workload" "$out") || true ;;
            store) read -r ops cpu fio_cpu < <(run_store "$workload" "$out") || true ;;
            nbd) read -r ops cpu fio_cpu < <(run_nbd "$workload" "$out") || true ;;
        esac
        [[ -n ${fio_cpu:-} ]] || die "$side $workload gave no result (see above; output in $out)"
        osd1=$(proc_ticks "$OSD_PID")
        osd_cpu=""
        [[ -z $osd0 || -z $osd1 ]] || osd_cpu=$(ticks_s "$((osd1 - osd0))")
        load=$(cut -d' ' -f1 /proc/loadavg)
        workload_args "$workload"
        echo "$round,$side,$workload,$IO_SIZE,$TOTAL,$ops,$cpu,$fio_cpu,$osd_cpu,$load" >>"$csv"
        log "round $round, $side: $workload $ops ops/s (CPU ${cpu}s, fio ${fio_cpu}s, OSD ${osd_cpu:-?}s, load $load)"
        ops="" cpu="" fio_cpu=""
    done
    stop_agent
    remove_image
}

# --- report --------------------------------------------------------------------------------

header() {
    echo "# RBD store benchmark: rbdsync (NBD export, store alone) vs rbd bench"
    echo
    echo "- command: \`$ORIG_CMDLINE\` (ROUNDS=$ROUNDS IMAGE_SIZE=$IMAGE_SIZE TOTAL_4M=$TOTAL_4M TOTAL_4K=$TOTAL_4K QD=$QD SIDES=\"$SIDES\")"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rbdsync: $("$AGENT_BIN" --version 2>/dev/null | head -n1) ($RBDSYNC, $(date -r "$RBDSYNC" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$AGENT_BIN" | cut -c1-16); git $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_DIR" status --porcelain -- agent proto 2>/dev/null | grep -q . && echo ', agent/ or proto/ differ from HEAD'))"
    if [[ -n $STORE_BIN ]]; then
        echo "- rbd_bench example: $RBD_BENCH ($(date -r "$RBD_BENCH" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$STORE_BIN" | cut -c1-16))"
    fi
    echo "- ceph: $(rbd --version | head -n1); librbd $(dpkg-query -W -f '${Version}' librbd1 2>/dev/null || echo '?')"
    echo "- cluster: $(if [[ -n $CEPH_DIR ]]; then echo "throw-away (deploy/dev/ceph-cluster.sh: 1 mon + 1 memstore OSD, size-1 pool, 127.0.0.1) in $CEPH_DIR"; else echo "existing, $CONF"; fi); images: $IMAGE_SIZE, 4 MiB objects, features from rbd_default_features, fresh per side and round"
    echo "- fio: $(fio --version) (nbd side: ioengine=nbd, 1 job, 1 connection, Unix socket; fio-rbd side: ioengine=rbd, 1 job, rbd_cache=false, rbd_disable_zero_copy_writes=false; both --iodepth=$QD --norandommap)"
    echo "- rbd bench: --io-threads $QD (its CPU: the process's user + system time minus the start-up CPU of a one-op rbd bench, measured with librbd's defaults and subtracted from both rbd bench sides); rbd-bench-nocache: the same with --rbd-cache=false, as the agent runs librbd; the example: $QD requests in flight on RbdStore's aio path from one thread"
    echo "- each cell: median over $ROUNDS rounds; sides run one at a time, order rotated per round"
}

report() {
    python3 - "$1" "$SIDES" <<'EOF'
import csv, os, statistics, sys
path, sides = sys.argv[1], sys.argv[2].split()
med = statistics.median
ops, cpu, fio_cpu, osd_cpu, loads, meta, by_round = {}, {}, {}, {}, [], {}, {}
with open(path) as f:
    for r in csv.DictReader(f):
        k = (r["workload"], r["side"])
        by_round[(r["workload"], r["side"], r["round"])] = float(r["ops_per_s"])
        n = int(r["total"]) / int(r["io_size"])
        ops.setdefault(k, []).append(float(r["ops_per_s"]))
        cpu.setdefault(k, []).append(float(r["cpu_s"]) / n * 1e6)
        fio_cpu.setdefault(k, []).append(float(r["fio_cpu_s"]) / n * 1e6)
        if r["osd_cpu_s"]:
            osd_cpu.setdefault(k, []).append(float(r["osd_cpu_s"]) / n * 1e6)
        loads.append(float(r["load1"]))
        meta[r["workload"]] = int(r["io_size"])
names = {"write4m": "4M seq write", "read4m": "4M seq read", "write4k": "4K rand write", "read4k": "4K rand read"}
refs = [s for s in ("rbd-bench", "rbd-bench-nocache", "fio-rbd") if s in sides]
benches = [s for s in refs if s != "fio-rbd"]
others = [s for s in sides if s not in refs]
ref = bool(refs)


def spread(v):
    return (max(v) - min(v)) / med(v) if med(v) else 0.0


def rate(w, s):
    v = med(ops[(w, s)])
    return v * meta[w] / 1048576 if meta[w] >= 1 << 20 else v


unit = lambda w: "MiB/s" if meta[w] >= 1 << 20 else "IOPS"
print("Throughput (median over rounds; higher is better):")
print()
head = ["workload", "unit"] + sides + [f"{s}/{r}" for r in refs for s in others]
head += [f"fio-rbd/{r}" for r in benches if "fio-rbd" in sides]
head += [f"nbd/{r} per round" for r in refs if "nbd" in sides]
head += ["spread " + " / ".join(sides)]
print("| " + " | ".join(head) + " |")
print("|---|---|" + "---:|" * (len(head) - 2))
misses = {(s, r): [] for r in benches for s in ("nbd", "store")}
for w in names:
    if not any((w, s) in ops for s in sides):
        continue
    line = [names[w], unit(w)] + [f"{rate(w, s):,.0f}" if (w, s) in ops else "-" for s in sides]
    for rf in refs:
        for s in others:
            r = rate(w, s) / rate(w, rf) if (w, s) in ops and (w, rf) in ops else None
            line.append(f"{r:.2f}" if r is not None else "-")
            if (s, rf) in misses and r is not None and r < 0.9:
                misses[(s, rf)].append(f"{names[w]} ({r:.2f}x)")
    for rf in benches if "fio-rbd" in sides else []:
        ok = (w, "fio-rbd") in ops and (w, rf) in ops
        line.append(f"{rate(w, 'fio-rbd') / rate(w, rf):.2f}" if ok else "-")
    for rf in refs:
        if "nbd" not in sides:
            continue
        rounds = sorted({k[2] for k in by_round if k[0] == w and k[1] == "nbd"}, key=int)
        per = [by_round[(w, "nbd", rd)] / by_round[(w, rf, rd)] for rd in rounds if (w, rf, rd) in by_round]
        line.append(", ".join(f"{x:.2f}" for x in per))
    line.append(" / ".join(f"{spread(ops[(w, s)]) * 100:.0f}%" if (w, s) in ops else "-" for s in sides))
    print("| " + " | ".join(line) + " |")
print()
print("CPU per operation in the process making the librbd calls (rbd bench; fio with its rbd engine; the agent; "
      "the example), "
      "user + system, all threads, microseconds (median; lower is better). fio's own CPU (the NBD client) "
      "is listed apart, and so is the OSD's CPU per operation during each side's runs (the OSD shares the "
      "machine's CPUs with every side):")
print()
osd = [s for s in sides if any((w, s) in osd_cpu for w in names)]
head = ["workload"] + [f"{s} us/op" for s in sides] + (["fio us/op"] if "nbd" in sides else [])
head += [f"OSD during {s} us/op" for s in osd]
print("| " + " | ".join(head) + " |")
print("|---|" + "---:|" * (len(head) - 1))
for w in names:
    if not any((w, s) in ops for s in sides):
        continue
    line = [names[w]] + [f"{med(cpu[(w, s)]):,.1f}" if (w, s) in cpu else "-" for s in sides]
    if "nbd" in sides:
        line.append(f"{med(fio_cpu[(w, 'nbd')]):,.1f}" if (w, "nbd") in fio_cpu else "-")
    line += [f"{med(osd_cpu[(w, s)]):,.1f}" if (w, s) in osd_cpu else "-" for s in osd]
    print("| " + " | ".join(line) + " |")
print()
if osd:
    print("CPU per operation of the whole IO path (the process calling librbd + fio for nbd + the OSD), "
          "microseconds, and the CPUs it kept busy (CPU per op x ops per second; this machine has "
          f"{os.cpu_count()}). When every side keeps the same number of CPUs busy, the machine is the limit "
          "and throughput ratios are ratios of these CPU costs:")
    print()
    head = ["workload"] + [f"{s} us/op" for s in osd] + [f"{s} CPUs busy" for s in osd]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for w in names:
        if not any((w, s) in osd_cpu for s in osd):
            continue
        total = {s: med(cpu[(w, s)]) + (med(fio_cpu[(w, s)]) if s == "nbd" else 0) + med(osd_cpu[(w, s)])
                 for s in osd if (w, s) in osd_cpu}
        line = [names[w]] + [f"{total[s]:,.0f}" if s in total else "-" for s in osd]
        line += [f"{total[s] * med(ops[(w, s)]) / 1e6:.2f}" if s in total else "-" for s in osd]
        print("| " + " | ".join(line) + " |")
    print()
    pairs = [(s, rf) for s in ("nbd", "store") for rf in benches if s in osd and rf in osd]
    if pairs:
        print("What 0.9x would take on this machine, modelled from the table above (same CPUs busy, so "
              "throughput = CPUs / CPU per op): the rbd bench side's whole-path CPU per op / 0.9, minus what "
              "the rest of our path spent (the OSD; fio for nbd), is the most the agent (or the example) "
              "could spend per op. Beside it: what it spent, and what rbd bench's own process spent:")
        print()
        print("| workload | side / peer | most it could spend, us/op | spent, us/op | the peer's own process, us/op |")
        print("|---|---|---:|---:|---:|")
        for w in names:
            for s, rf in pairs:
                if (w, s) not in osd_cpu or (w, rf) not in osd_cpu:
                    continue
                peer = med(cpu[(w, rf)]) + med(osd_cpu[(w, rf)])
                rest = med(osd_cpu[(w, s)]) + (med(fio_cpu[(w, s)]) if s == "nbd" else 0)
                print(f"| {names[w]} | {s} / {rf} | {peer / 0.9 - rest:,.0f} | {med(cpu[(w, s)]):,.0f} | "
                      f"{med(cpu[(w, rf)]):,.0f} |")
        print()
for (s, rf), missed in misses.items():
    if s not in sides:
        continue
    peer = {"rbd-bench": "rbd bench, librbd defaults", "rbd-bench-nocache": "rbd bench --rbd-cache=false"}[rf]
    if missed:
        print(f"- goal ({s} >= 0.9x {peer} on every row): **NOT met** on {', '.join(missed)}")
    else:
        print(f"- goal ({s} >= 0.9x {peer} on every row): met")
if "fio-rbd" in sides and benches:
    print("- fio-rbd/rbd-bench: how close a librbd client that writes real (changing) buffers and reads into its "
          "own buffers through the C API gets to rbd bench on this machine")
print(f"- spread = (max - min) / median over the rounds. 1-minute load average after each run: min {min(loads):.2f}, "
      f"median {med(loads):.2f}, max {max(loads):.2f}.")
EOF
}

# --- main ----------------------------------------------------------------------------------

main() {
    check_params
    check_tools
    case " $SIDES " in *" nbd "*) ensure_built "$RBDSYNC" "$REPO_DIR/target/release/rbdsync" build --release -p agent ;; esac
    case " $SIDES " in *" store "*)
        ensure_built "$RBD_BENCH" "$REPO_DIR/target/release/examples/rbd_bench" build --release -p agent --example rbd_bench
        ;;
    esac

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d /dev/shm/rbd-store-bench.XXXXXX)
    mkdir -p "$WORK/out" "$RESULTS_DIR"
    # The agent binary is needed for the header even when only other sides run.
    [[ -x $RBDSYNC ]] || ensure_built "$RBDSYNC" "$REPO_DIR/target/release/rbdsync" build --release -p agent
    AGENT_BIN="$WORK/agent-under-test"
    cp "$RBDSYNC" "$AGENT_BIN"
    if [[ " $SIDES " == *" store "* ]]; then
        STORE_BIN="$WORK/store-under-test"
        cp "$RBD_BENCH" "$STORE_BIN"
    fi
    start_cluster
    find_osd

    local hdr
    hdr=$(header)
    echo "$hdr"
    echo

    [[ " $SIDES " != *" rbd-bench"* ]] || measure_rbd_startup
    [[ " $SIDES " != *" fio-rbd "* ]] || measure_fio_rbd_startup
    local csv="$WORK/runs.csv"
    echo "round,side,workload,io_size,total,ops_per_s,cpu_s,fio_cpu_s,osd_cpu_s,load1" >"$csv"
    local -a sides
    read -r -a sides <<<"$SIDES"
    local n=${#sides[@]} round i
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            run_side "${sides[$(((i + round - 1) % n))]}" "$round" "$csv"
        done
    done

    local table rss
    table=$(report "$csv")
    rss=$(osd_rss)
    {
        echo "$hdr"
        echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg); OSD resident memory at end: $rss MiB; rbd bench start-up CPU subtracted per run: ${RBD_STARTUP_CPU}s; fio rbd-engine start-up CPU subtracted per run: ${FIO_RBD_STARTUP_CPU}s"
        echo
        echo "$table"
    } >"$RESULTS_DIR/rbd-store.md"
    cp "$csv" "$RESULTS_DIR/rbd-store.csv"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg); OSD resident memory at end: $rss MiB; rbd bench start-up CPU subtracted per run: ${RBD_STARTUP_CPU}s; fio rbd-engine start-up CPU subtracted per run: ${FIO_RBD_STARTUP_CPU}s"
    echo
    echo "$table"
    echo
    echo "Written: $RESULTS_DIR/rbd-store.md (raw runs: $RESULTS_DIR/rbd-store.csv)"
}

main "$@"
