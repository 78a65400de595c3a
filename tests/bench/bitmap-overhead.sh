#!/usr/bin/env bash
# Dirty-bitmap overhead benchmark: the rbdsync agent serving a raw file on tmpfs with 0, 1 and 4
# enabled persistent bitmaps, driven by fio's nbd engine over the agent's Unix socket.
#
# Every configuration gets a fresh agent, a fresh sparse image ($SIZE, on /dev/shm) and fresh
# bitmaps; per round, the configurations run one after the other (order rotated per round), each
# running these phases in this order:
#   first touch, 1M seq write QD4   writes $REGION from offset 0 once (every granule clean)
#   steady, 4K rand write QD16      random writes over $REGION (all granules dirty: no syncs)
#   steady, 1M seq write QD4        sequential writes over $REGION (likewise)
#   first touch, 4K rand write QD16 replays an iolog of 4K writes, each into a different clean
#                                   granule (random order, beyond $REGION): every write marks a
#                                   new bit, so every write waits for a bitmap sync
# Bitmap state (state_dir, i.e. the .bitmap files that are fdatasync'ed on first touch) lives on a
# real disk ($STATE_DISK_DIR) or on tmpfs, as configured by STATE; the image is always on tmpfs.
# Goals (from the bitmap issue): 4 bitmaps cost <= 3% of IOPS once regions are dirty and <= 10% on
# first-touch writes; the report says whether they were met.
#
# Then, once: the agent's resident memory serving a $RSS_SIZE sparse image with 0 and 4 bitmaps
# (idle, after a burst of random writes, after a restart that reloads the bitmaps), and the
# bitmap_scan example (memory and time to find every dirty extent of a 1 TiB bitmap, 1% dirty).
#
# Usage: tests/bench/bitmap-overhead.sh
# Environment:
#   ROUNDS=3          rounds of the overhead part
#   RUNTIME=3         seconds measured per time-based fio run (after a 1 s ramp)
#   SIZE=64GiB        sparse image size of the overhead part (room for clean granules)
#   REGION=1GiB       region written first (1M first touch) and rewritten in the steady runs
#   BITMAPS="0 1 4"   bitmap counts to compare (the ratios are against the first one)
#   GRANULARITY=64KiB granularity of every bitmap
#   STATE="disk tmpfs" where the bitmap files of the configurations with bitmaps live
#   STATE_DISK_DIR=/var/tmp  parent of the on-disk state directory (must not be tmpfs)
#   FT_IOS=1000000    at most this many distinct granules in the first-touch 4K iolog
#   RSS=1             0 skips the memory part; RSS_SIZE=1TiB, RSS_RUNTIME=3
#   RSS_4K=1          also measure 4 bitmaps at 4 KiB granularity in the memory part
#   SCAN=1            0 skips the bitmap_scan example; SCAN_ITERS=15
#   RBDSYNC=...       agent binary (default target/release/rbdsync, built if missing)
#   BITMAP_SCAN=...   example binary (default target/release/examples/bitmap_scan, built if missing)
#   KEEP=1            keep the work directories (logs, configs, fio JSON)
# Needs: fio (with the nbd engine), python3.   apt-get install -y fio
# Default run: 3 rounds x 5 configurations x ~16 s + ~40 s memory part = about 5 minutes.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-3}
SIZE=${SIZE:-64GiB}
REGION=${REGION:-1GiB}
BITMAPS=${BITMAPS:-"0 1 4"}
GRANULARITY=${GRANULARITY:-64KiB}
STATE=${STATE:-"disk tmpfs"}
STATE_DISK_DIR=${STATE_DISK_DIR:-/var/tmp}
FT_IOS=${FT_IOS:-1000000}
RSS=${RSS:-1}
RSS_SIZE=${RSS_SIZE:-1TiB}
RSS_RUNTIME=${RSS_RUNTIME:-3}
RSS_4K=${RSS_4K:-1}
SCAN=${SCAN:-1}
SCAN_ITERS=${SCAN_ITERS:-15}
KEEP=${KEEP:-0}
RAMP=1
EXPORT=bench/disk0
# Order matters: the steady runs come before the first-touch 4K run, whose burst of bitmap syncs
# leaves the agent with dozens of idle blocking threads for ~10 s (see README).
PHASES=(ft-seq1m steady-rand4k steady-seq1m ft-rand4k)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
RBDSYNC=${RBDSYNC:-$REPO_DIR/target/release/rbdsync}
BITMAP_SCAN=${BITMAP_SCAN:-$REPO_DIR/target/release/examples/bitmap_scan}

# WORK: on tmpfs (image, configs, logs, fio output). DISK_WORK: on a real disk (bitmap state).
# Neither name holds "rbdsync", nor does the copied binary's: another test's `pkill -f rbdsync`
# on a shared machine must not stop the agent under fio.
WORK=""
DISK_WORK=""
AGENT_BIN=""
SCAN_BIN=""
AGENT_PID=""
AGENT_LOG=""
STARTUP_S=""
SOCK=""
URI=""
ORIG_CMDLINE="$0${*:+ $*}"

die() {
    if [[ -z $WORK || (-d $WORK && ! -e $WORK/interrupted) ]]; then
        echo "bitmap-overhead.sh: error: $*" >&2
    fi
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

# --- cleanup -------------------------------------------------------------------------------

stop_agent() {
    local pid=$AGENT_PID
    AGENT_PID=""
    stop_pid "$pid" agent
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -gt 128 && -n $WORK && -d $WORK ]]; then
        : >"$WORK/interrupted"
    fi
    stop_agent
    local d
    for d in "$WORK" "$DISK_WORK"; do
        [[ -n $d && -d $d ]] || continue
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            # Keep logs and configs of a failed run, but free the large files.
            find "$d" -name '*.raw' -delete 2>/dev/null || true
            rm -f "$d/agent-under-test" "$d/scan-under-test" "$d/ft.iolog"
            echo "bitmap-overhead.sh: work directory kept: $d" >&2
        else
            rm -rf "$d"
        fi
    done
    exit "$rc"
}

# --- checks and setup ----------------------------------------------------------------------



check_params() {
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
    [[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer of seconds (got '$RUNTIME')"
    [[ $RSS_RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RSS_RUNTIME must be a positive integer (got '$RSS_RUNTIME')"
    [[ $FT_IOS =~ ^[1-9][0-9]*$ ]] || die "FT_IOS must be a positive integer (got '$FT_IOS')"
    [[ $SCAN_ITERS =~ ^[1-9][0-9]*$ ]] || die "SCAN_ITERS must be a positive integer (got '$SCAN_ITERS')"
    local b s
    for b in $BITMAPS; do
        [[ $b =~ ^[0-9]+$ ]] || die "BITMAPS: '$b' is not a count"
    done
    [[ -n $BITMAPS ]] || die "BITMAPS is empty"
    for s in $STATE; do
        [[ $s == disk || $s == tmpfs ]] || die "STATE: '$s' is neither disk nor tmpfs"
    done
    SIZE_B=$(bytes "$SIZE" SIZE)
    REGION_B=$(bytes "$REGION" REGION)
    GRAN_B=$(bytes "$GRANULARITY" GRANULARITY)
    RSS_SIZE_B=$(bytes "$RSS_SIZE" RSS_SIZE)
    ((GRAN_B >= 4096 && (GRAN_B & (GRAN_B - 1)) == 0)) || die "GRANULARITY must be a power of two >= 4KiB"
    ((REGION_B >= 1 << 20 && REGION_B % (1 << 20) == 0)) || die "REGION must be a positive multiple of 1 MiB"
    ((SIZE_B % GRAN_B == 0 && SIZE_B >= REGION_B + 256 * GRAN_B)) ||
        die "SIZE must be a multiple of GRANULARITY with room for first-touch writes past REGION"
    ((RSS_SIZE_B % (1 << 20) == 0)) || die "RSS_SIZE must be a multiple of 1 MiB"
}

check_tools() {
    need fio fio
    need python3 python3
    need timeout coreutils
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd failed)"
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

# The configurations: "0" (no bitmaps) and "N@disk" / "N@tmpfs" for each count N > 0.
configs() {
    local b s
    for b in $BITMAPS; do
        if ((b == 0)); then
            echo 0
        else
            for s in $STATE; do echo "$b@$s"; done
        fi
    done
}

# Writes the first-touch iolog: one 4K write into each of FT_IOS distinct granules past REGION,
# in random order, at a random 4K slot of the granule (seeded, same for every configuration).
write_iolog() {
    python3 - "$WORK/ft.iolog" "$SIZE_B" "$REGION_B" "$GRAN_B" "$FT_IOS" <<'EOF'
import random, sys
path, size, region, gran, n = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(20240601)
first, last = region // gran, size // gran
n = min(n, last - first)
slots = gran // 4096
with open(path, "w") as f:
    f.write("fio version 2 iolog\nnbd add\nnbd open\n")
    for g in rng.sample(range(first, last), n):
        f.write(f"nbd write {g * gran + rng.randrange(slots) * 4096} 4096\n")
    f.write("nbd close\n")
print(n)
EOF
}

# --- the agent -----------------------------------------------------------------------------

# agent_config DIR STATE_DIR IMAGE SIZE_BYTES NBITMAPS GRANULARITY: writes DIR/agent.yaml, DIR/vms.d.
agent_config() {
    local dir=$1 state=$2 image=$3 size=$4 n=$5 gran=$6 i
    mkdir -p "$dir/vms.d" "$state"
    agent_yaml "$dir" "$state" >"$dir/agent.yaml"
    {
        echo "name: bench"
        echo "disks:"
        echo "  - name: disk0"
        echo "    image: file:$image"
        echo "    size: $size"
        if ((n == 0)); then
            echo "    bitmaps: []"
        else
            echo "    bitmaps:"
            for ((i = 1; i <= n; i++)); do
                echo "      - {name: b$i, granularity: $gran}"
            done
        fi
    } >"$dir/vms.d/bench.yaml"
}

# start_agent DIR STATE_DIR: starts the agent on DIR/agent.yaml, waits until it serves; sets
# AGENT_PID, SOCK, URI and STARTUP_S (seconds from exec to serving).
start_agent() {
    local dir=$1 state=$2 t0 i
    AGENT_LOG="$dir/agent.log"
    SOCK="$dir/nbd.sock"
    URI="nbd+unix:///$EXPORT?socket=$SOCK"
    rm -f "$SOCK" "$dir/control.sock" "$state/agent.json"
    t0=$EPOCHREALTIME
    "$AGENT_BIN" agent --config "$dir/agent.yaml" >>"$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
    for ((i = 0; i < 300; i++)); do
        [[ -s $state/agent.json && -S $SOCK ]] && break
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent exited during startup: $(tail -n 5 "$AGENT_LOG")"
        sleep 0.05
    done
    [[ -s $state/agent.json && -S $SOCK ]] || die "agent not serving within 15 s; see $AGENT_LOG"
    STARTUP_S=$(python3 -c "print(f'{$EPOCHREALTIME - $t0:.2f}')")
}

# Prints the agent's CPU time (user + system, all threads) in clock ticks.
agent_ticks() {
    local stat
    stat=$(<"/proc/$AGENT_PID/stat") || die "agent (pid $AGENT_PID) is gone"
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# agent_mem FIELD: prints FIELD (VmRSS, VmHWM) of the agent in KiB.
agent_mem() {
    awk -v f="$1:" '$1 == f {print $2}' "/proc/$AGENT_PID/status"
}

# Prints the dirty bytes of bitmap b1 (empty if there is none).
dirty_bytes() {
    "$AGENT_BIN" --control "unix:$1/control.sock" --json bitmap list "$EXPORT" 2>/dev/null |
        python3 -c 'import json, sys
v = json.load(sys.stdin)
v = v.get("bitmaps", v) if isinstance(v, dict) else v
print(next((b["dirty_bytes"] for b in v if b["name"] == "b1"), ""))' 2>/dev/null || true
}

# --- fio -----------------------------------------------------------------------------------

# run_fio PHASE OUTFILE: runs one phase against $URI; prints "VALUE CPU_PER_UNIT SECONDS" (IOPS
# for 4K, MiB/s for 1M; agent CPU in us per 4K op or per MiB; fio's own runtime).
run_fio() {
    local phase=$1 out=$2 ticks0 ticks1 unit
    local -a args
    case $phase in
        ft-seq1m)
            # Not time-based: exactly REGION, once (the cap only guards against a stall).
            args=(--rw=write --bs=1M --iodepth=4 --offset=0 --size="$REGION_B" --runtime=300)
            unit=mib ;;
        ft-rand4k)
            args=(--read_iolog="$WORK/ft.iolog" --replay_no_stall=1 --iodepth=16
                --runtime="$RUNTIME" --ramp_time="$RAMP")
            unit=iops ;;
        steady-rand4k)
            args=(--rw=randwrite --bs=4k --iodepth=16 --offset=0 --size="$REGION_B" --norandommap
                --randrepeat=0 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
            unit=iops ;;
        steady-seq1m)
            args=(--rw=write --bs=1M --iodepth=4 --offset=0 --size="$REGION_B"
                --time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
            unit=mib ;;
        *) die "unknown phase $phase" ;;
    esac
    ticks0=$(agent_ticks)
    # fio prints "fio: connected to NBD server" on stdout, so the JSON goes to a file.
    if ! timeout 400 fio --name="$phase" --ioengine=nbd --uri="$URI" --numjobs=1 "${args[@]}" \
        --output-format=json --output="$out" >"$out.stdout" 2>&1; then
        local why="it is still running"
        kill -0 "$AGENT_PID" 2>/dev/null || why="it is gone; end of $AGENT_LOG: $(tail -n 3 "$AGENT_LOG")"
        die "fio $phase failed: $(tail -n 5 "$out.stdout")
  agent (pid $AGENT_PID): $why"
    fi
    ticks1=$(agent_ticks)
    local ramp=0
    [[ " ${args[*]} " == *" --ramp_time="* ]] && ramp=$RAMP
    python3 - "$out" "$unit" "$((ticks1 - ticks0))" "$(getconf CLK_TCK)" "$ramp" <<'EOF'
import json, sys
path, unit, ticks, hz, ramp = sys.argv[1:]
cpu_s = int(ticks) / int(hz)
with open(path) as f:
    text = f.read()
doc = json.loads(text[text.index("{"):])
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']} in {path}")
w = job["write"]
if w["io_bytes"] == 0:
    sys.exit(f"fio moved no data in {path}")
rate = w["iops"] if unit == "iops" else w["bw_bytes"] / 1048576
# The agent's CPU over the whole fio run, divided by the work of the ramp + the measured part
# (estimated as the measured rate times their duration; fio's start-up, e.g. parsing an iolog,
# costs the agent nothing and is left out).
work = rate * (job["job_runtime"] / 1000 + float(ramp))
print(f"{rate:.1f} {cpu_s / work * 1e6:.2f} {job['job_runtime'] / 1000:.2f}")
EOF
}

# --- the overhead part ---------------------------------------------------------------------

# run_config CFG ROUND CSV: one configuration, fresh image + state, all phases.
run_config() {
    local cfg=$1 round=$2 csv=$3 n where tag dir state image phase value cpu secs load startup
    n=${cfg%@*}
    where=disk
    [[ $cfg == *@* ]] && where=${cfg#*@}
    # No "@" in paths: "file:...@x" would name a snapshot.
    tag=${cfg/@/-}
    dir="$WORK/cfg-$tag"
    if [[ $where == disk ]]; then state="$DISK_WORK/state-$tag"; else state="$dir/state"; fi
    image="$WORK/disk-$tag.raw"
    rm -rf "$state" "$image"
    agent_config "$dir" "$state" "$image" "$SIZE_B" "$n" "$GRAN_B"
    start_agent "$dir" "$state"
    startup=$STARTUP_S
    for phase in "${PHASES[@]}"; do
        read -r value cpu secs < <(run_fio "$phase" "$WORK/fio/r$round-$tag-$phase.json") ||
            die "fio $phase against configuration $cfg failed (see above)"
        [[ -n $secs ]] || die "fio $phase against configuration $cfg gave no result"
        kill -0 "$AGENT_PID" 2>/dev/null || die "agent died during $phase; see $AGENT_LOG"
        load=$(cut -d' ' -f1 /proc/loadavg)
        echo "$round,$cfg,$n,$where,$phase,$value,$cpu,$secs,$load" >>"$csv"
        log "round $round, $cfg bitmaps: $phase $value (agent CPU $cpu us/unit, fio ${secs}s, load $load)"
    done
    if ((n > 0)); then
        local dirty
        dirty=$(dirty_bytes "$dir")
        [[ -z $dirty ]] || ((dirty >= REGION_B)) ||
            die "bitmap b1 of configuration $cfg holds $dirty dirty bytes, less than REGION ($REGION_B)"
        log "round $round, $cfg bitmaps: startup ${startup}s, bitmap b1 dirty: $((${dirty:-0} >> 20)) MiB"
    fi
    stop_agent
    rm -rf "$image" "$state"
}

# --- the memory part -----------------------------------------------------------------------

# rss_config LABEL NBITMAPS GRANULARITY CSV: fresh agent on a sparse RSS_SIZE image (state on
# disk): RSS idle, after RSS_RUNTIME s of 4K random writes over the whole image, and idle again
# after a restart that reloads the bitmap files.
rss_config() {
    local label=$1 n=$2 gran=$3 csv=$4 dir state image t_fresh t_restart idle burst hwm reloaded
    local value cpu secs
    dir="$WORK/rss-$label"
    state="$DISK_WORK/rss-state-$label"
    image="$WORK/rss-$label.raw"
    rm -rf "$state" "$image"
    agent_config "$dir" "$state" "$image" "$RSS_SIZE_B" "$n" "$gran"
    start_agent "$dir" "$state"
    t_fresh=$STARTUP_S
    sleep 1
    idle=$(agent_mem VmRSS)
    # (The process substitution is a subshell: these assignments stay in it.)
    read -r value cpu secs < <(
        RUNTIME=$RSS_RUNTIME
        REGION_B=$RSS_SIZE_B
        run_fio steady-rand4k "$WORK/fio/rss-$label.json"
    ) || die "fio against the memory configuration $label failed"
    burst=$(agent_mem VmRSS)
    hwm=$(agent_mem VmHWM)
    stop_agent
    start_agent "$dir" "$state"
    t_restart=$STARTUP_S
    sleep 1
    reloaded=$(agent_mem VmRSS)
    stop_agent
    rm -rf "$image" "$state"
    echo "$label,$n,$gran,$idle,$burst,$hwm,$reloaded,$t_fresh,$t_restart,$value" >>"$csv"
    log "memory, $label: VmRSS idle $idle KiB, after writes $burst KiB (HWM $hwm), after restart $reloaded KiB; 4K writes $value IOPS"
}

# --- report --------------------------------------------------------------------------------

header() {
    echo "# Dirty-bitmap overhead benchmark"
    echo
    echo "- command: \`$ORIG_CMDLINE\` (ROUNDS=$ROUNDS RUNTIME=$RUNTIME SIZE=$SIZE REGION=$REGION BITMAPS=\"$BITMAPS\" GRANULARITY=$GRANULARITY STATE=\"$STATE\" FT_IOS=$FT_IOS RSS=$RSS RSS_SIZE=$RSS_SIZE SCAN=$SCAN)"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- rbdsync: $("$AGENT_BIN" --version 2>/dev/null | head -n1) ($RBDSYNC, $(date -r "$RBDSYNC" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$AGENT_BIN" | cut -c1-16); git $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_DIR" status --porcelain -- agent proto 2>/dev/null | grep -q . && echo ', agent/ or proto/ differ from HEAD'))"
    if [[ -n $SCAN_BIN ]]; then
        echo "- bitmap_scan: $BITMAP_SCAN ($(date -r "$BITMAP_SCAN" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$SCAN_BIN" | cut -c1-16))"
    fi
    echo "- fio: $(fio --version) (ioengine=nbd, libnbd; 1 job, 1 connection, Unix socket)"
    echo "- image: $SIZE sparse raw file on tmpfs ($(df --output=target "$WORK" | tail -n1 | tr -d ' ')), fresh per configuration and round"
    echo "- bitmap state (state_dir): disk = $DISK_WORK ($(df --output=source,fstype "$DISK_WORK" | tail -n1 | tr -s ' ')), tmpfs = under $WORK; configuration 0 keeps its (empty) state on disk"
    echo "- bitmaps: N x {granularity: $GRANULARITY}, all enabled; phases per configuration, in order: first-touch 1M seq write QD4 over $REGION (once, not time-based); steady 4K randwrite QD16 and 1M seq write QD4 over $REGION (all dirty; --time_based --runtime=$RUNTIME --ramp_time=$RAMP); first-touch 4K writes QD16 replayed from an iolog (each into a different clean granule past $REGION; --runtime=$RUNTIME --ramp_time=$RAMP)"
    echo "- each cell: median over $ROUNDS rounds; configurations run one at a time, order rotated per round"
}

# report CSV: the Markdown tables and the goal verdicts.
report() {
    python3 - "$1" "$(configs | tr '\n' ' ')" <<'EOF'
import csv, statistics, sys
path, cfgs = sys.argv[1], sys.argv[2].split()
med = statistics.median
vals, cpus, loads, by_round = {}, {}, [], {}
with open(path) as f:
    for r in csv.DictReader(f):
        vals.setdefault((r["phase"], r["config"]), []).append(float(r["value"]))
        by_round[(r["phase"], r["config"], r["round"])] = float(r["value"])
        cpus.setdefault((r["phase"], r["config"]), []).append(float(r["cpu_us_per_unit"]))
        loads.append(float(r["load1"]))
phases = {"ft-seq1m": ("first touch", "1M seq write QD4", "MiB/s", "us/MiB"),
          "ft-rand4k": ("first touch", "4K rand write QD16", "IOPS", "us/op"),
          "steady-rand4k": ("steady", "4K rand write QD16", "IOPS", "us/op"),
          "steady-seq1m": ("steady", "1M seq write QD4", "MiB/s", "us/MiB")}
base = cfgs[0]


def spread(v):
    return (max(v) - min(v)) / med(v) if med(v) else 0.0


def label(c):
    n, _, where = c.partition("@")
    return n, (where or "-")


print(f"Throughput and agent CPU (median over rounds; ratios against {base} bitmaps):")
print()
print("| phase | workload | bitmaps | state | unit | median | vs " + base + " | spread | agent CPU/unit | CPU vs " + base + " |")
print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
ratio = {}
for p, (kind, wl, unit, cunit) in phases.items():
    for c in cfgs:
        if (p, c) not in vals:
            continue
        v, cp = med(vals[(p, c)]), med(cpus[(p, c)])
        b, bc = med(vals[(p, base)]), med(cpus[(p, base)])
        ratio[(p, c)] = v / b
        n, where = label(c)
        print(f"| {kind} | {wl} | {n} | {where} | {unit} | {v:,.0f} | {v / b:.3f} | "
              f"{spread(vals[(p, c)]) * 100:.0f}% | {cp:,.1f} {cunit} | {cp / bc:.2f} |")
print()
print("Goals (4 bitmaps against 0; throughput ratio):")
print()
print("| goal | phase | state | ratio (median) | per-round ratios | needed | result |")
print("|---|---|---|---:|---|---:|---|")
for c in cfgs:
    n, where = label(c)
    if n != "4" or base != "0":
        continue
    for p, need, goal in (("steady-rand4k", 0.97, "<= 3% loss once dirty"),
                          ("steady-seq1m", 0.97, "<= 3% loss once dirty"),
                          ("ft-rand4k", 0.90, "<= 10% loss on first touch"),
                          ("ft-seq1m", 0.90, "<= 10% loss on first touch")):
        if (p, c) not in ratio:
            continue
        r = ratio[(p, c)]
        # The ratio within each round (configuration against 0 bitmaps of the same round).
        rounds = sorted({k[2] for k in by_round if k[0] == p and k[1] == c}, key=int)
        per = [by_round[(p, c, rd)] / by_round[(p, base, rd)] for rd in rounds if (p, base, rd) in by_round]
        ok = sum(x >= need for x in per)
        if r >= need:
            verdict = "met"
        elif ok:
            verdict = f"not met on the median; met in {ok} of {len(per)} rounds (noisy: rerun with more ROUNDS)"
        else:
            verdict = "**NOT met** (in no round)"
        print(f"| {goal} | {phases[p][0]} {phases[p][1]} | {where} | {r:.3f} | "
              f"{', '.join(f'{x:.2f}' for x in per)} | {need:.2f} | {verdict} |")
print()
print(f"- spread = (max - min) / median over the rounds. 1-minute load average after each run: min {min(loads):.2f}, "
      f"median {med(loads):.2f}, max {max(loads):.2f} (fio + the agent alone keep it near 2).")
print("- agent CPU/unit: user + system CPU of the agent (all threads, /proc) over the fio run, per 4K op or per MiB; "
      "less sensitive to other load than throughput.")
EOF
}

report_rss() {
    python3 - "$1" "$RSS_SIZE" "$RSS_SIZE_B" <<'EOF'
import csv, sys
path, size, size_b = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(path)))
base = next((r for r in rows if r["nbitmaps"] == "0"), None)
print(f"Agent resident memory serving a {size} sparse image (VmRSS, KiB; state on disk):")
print()
print("| bitmaps | granularity | bitmap sets in memory (2 per bitmap) | idle after start | vs 0 | "
      "after 4K random writes | vs 0 | VmHWM | after restart (bitmaps reloaded) | vs 0 | startup s (fresh / restart) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    n, g = int(r["nbitmaps"]), int(r["granularity"])
    words = -(-size_b // g) // 64
    sets = 2 * n * (words + -(-words // 64)) * 8
    d = lambda k: f"{int(r[k]) - int(base[k]):+,}" if base else "-"
    print(f"| {n} | {g >> 10} KiB | {sets / 1048576:,.1f} MiB | {int(r['idle_kib']):,} | {d('idle_kib')} | "
          f"{int(r['burst_kib']):,} | {d('burst_kib')} | {int(r['hwm_kib']):,} | {int(r['reloaded_kib']):,} | "
          f"{d('reloaded_kib')} | {r['startup_s']} / {r['restart_s']} |")
print()
print(f"- 'after 4K random writes': RSS after the writes of 'writes' below, spread over the whole image, "
      "so they touch pages all over every bitmap; the image's written pages are on tmpfs, not in the agent.")
print("- 4K random write IOPS during that burst (first touch nearly everywhere; state on disk): " +
      ", ".join(f"{r['nbitmaps']} x {int(r['granularity']) >> 10} KiB: {float(r['iops']):,.0f}" for r in rows))
EOF
}

# --- main ----------------------------------------------------------------------------------

main() {
    check_params
    check_tools
    [[ -d /dev/shm ]] || die "/dev/shm (tmpfs) is missing"
    [[ -d $STATE_DISK_DIR ]] || die "STATE_DISK_DIR=$STATE_DISK_DIR does not exist"
    [[ $(stat -f -c %T "$STATE_DISK_DIR") != tmpfs ]] || die "STATE_DISK_DIR=$STATE_DISK_DIR is on tmpfs"
    local avail
    avail=$(df -B1 --output=avail /dev/shm | tail -n1 | tr -d ' ')
    ((avail > REGION_B + (4 << 30))) || die "/dev/shm has $((avail >> 20)) MiB free; REGION + 4 GiB needed"
    ensure_built "$RBDSYNC" "$REPO_DIR/target/release/rbdsync" build --release -p agent
    if [[ $SCAN == 1 ]]; then
        ensure_built "$BITMAP_SCAN" "$REPO_DIR/target/release/examples/bitmap_scan" \
            build --release -p agent --example bitmap_scan
    fi

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d /dev/shm/bitmap-overhead-bench.XXXXXX)
    DISK_WORK=$(mktemp -d "$STATE_DISK_DIR/bitmap-overhead-bench.XXXXXX")
    mkdir -p "$WORK/fio" "$RESULTS_DIR"
    AGENT_BIN="$WORK/agent-under-test"
    cp "$RBDSYNC" "$AGENT_BIN"
    if [[ $SCAN == 1 ]]; then
        SCAN_BIN="$WORK/scan-under-test"
        cp "$BITMAP_SCAN" "$SCAN_BIN"
    fi

    local hdr
    hdr=$(header)
    echo "$hdr"
    echo

    local ft_n
    ft_n=$(write_iolog)
    log "first-touch iolog: $ft_n writes into distinct $GRANULARITY granules past $REGION"

    local csv="$WORK/runs.csv"
    echo "round,config,nbitmaps,state,phase,value,cpu_us_per_unit,fio_seconds,load1" >"$csv"
    local -a cfgs
    mapfile -t cfgs < <(configs)
    local n=${#cfgs[@]} round i
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            run_config "${cfgs[$(((i + round - 1) % n))]}" "$round" "$csv"
        done
    done
    # A first-touch replay that ended before its runtime ran out of iolog entries.
    python3 - "$WORK/fio" "$RUNTIME" <<'EOF' >&2 || true
import glob, json, sys
for p in sorted(glob.glob(sys.argv[1] + "/*ft-rand4k.json")):
    t = open(p).read()
    job = json.loads(t[t.index("{"):])["jobs"][0]
    if job["job_runtime"] < 900 * int(sys.argv[2]):
        print(f"note: {p}: replay ended after {job['job_runtime']} ms (iolog exhausted; raise FT_IOS or SIZE)")
EOF

    local table rss_table="" scan_table=""
    table=$(report "$csv")

    if [[ $RSS == 1 ]]; then
        local rss_csv="$WORK/rss.csv"
        echo "label,nbitmaps,granularity,idle_kib,burst_kib,hwm_kib,reloaded_kib,startup_s,restart_s,iops" >"$rss_csv"
        rss_config none 0 65536 "$rss_csv"
        rss_config 4x64k 4 65536 "$rss_csv"
        [[ $RSS_4K == 1 ]] && rss_config 4x4k 4 4096 "$rss_csv"
        rss_table=$(report_rss "$rss_csv")
        cp "$rss_csv" "$RESULTS_DIR/bitmap-overhead-rss.csv"
    fi
    if [[ $SCAN == 1 ]]; then
        log "running bitmap_scan --iters $SCAN_ITERS"
        scan_table=$("$SCAN_BIN" --iters "$SCAN_ITERS") || die "bitmap_scan failed"
    fi

    {
        echo "$hdr"
        echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
        echo "$table"
        [[ -z $rss_table ]] || printf '\n%s\n' "$rss_table"
        [[ -z $scan_table ]] || printf '\n%s\n' "$scan_table"
    } >"$RESULTS_DIR/bitmap-overhead.md"
    cp "$csv" "$RESULTS_DIR/bitmap-overhead.csv"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "$table"
    [[ -z $rss_table ]] || printf '\n%s\n' "$rss_table"
    [[ -z $scan_table ]] || printf '\n%s\n' "$scan_table"
    echo
    echo "Written: $RESULTS_DIR/bitmap-overhead.md (raw runs: $RESULTS_DIR/bitmap-overhead.csv)"
}

main "$@"
