#!/usr/bin/env bash
# NBD export benchmark: rbdsync vs qemu-nbd, nbdkit and nbd-server, all serving the same raw file on tmpfs.
#
# Each round starts every server in turn (one at a time, the order rotating per round) once per
# transport (TCP on 127.0.0.1, Unix socket) and runs four fio workloads against it through
# fio's nbd engine (libnbd, one connection):
#   4K randread / 4K randwrite at iodepth 16   (reported in IOPS)
#   1M seq read / 1M seq write at iodepth 4    (reported in MiB/s)
# The table holds the median over the rounds, the ratio rbdsync/best (the best peer in that cell)
# and rbdsync/each peer.
# It is printed and written as Markdown to tests/bench/results/nbd-export.md (raw runs in
# nbd-export.csv beside it). Only loopback addresses and Unix sockets are used.
#
# Usage: tests/bench/nbd-export.sh
# Environment:
#   ROUNDS=3        rounds (each round runs every server for every workload and transport)
#   RUNTIME=4       seconds measured per fio run (after a 1 s ramp)
#   SIZE=1GiB       size of the image (bytes, or with K/KiB, M/MiB, G/GiB; a multiple of 1 MiB)
#   RBDSYNC=...     rbdsync binary (default target/release/rbdsync, built if missing)
#   SERVERS="rbdsync qemu-nbd nbdkit nbd-server"   subset/order of servers
#   WORKLOADS="randread4k randwrite4k read1m write1m"   subset of the workloads
#   KEEP=1          keep the work directory (logs, configs, fio JSON) instead of deleting it
# Needs: fio (with the nbd engine), qemu-nbd, nbdkit (+ file plugin), nbd-server, python3.
#   apt-get install -y fio nbdkit qemu-utils nbd-server
# Default run: 3 rounds x 3 servers x 2 transports x 4 workloads x ~5.5 s = about 7 minutes.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-1GiB}
RAMP=1
SERVERS=${SERVERS:-"rbdsync qemu-nbd nbdkit nbd-server"}
KEEP=${KEEP:-0}
EXPORT=bench/disk0
read -r -a WORKLOADS <<<"${WORKLOADS:-randread4k randwrite4k read1m write1m}"
TRANSPORTS=(tcp unix)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
RBDSYNC=${RBDSYNC:-$REPO_DIR/target/release/rbdsync}

WORK=""
# The copy of $RBDSYNC that is run, so that a rebuild during the run changes nothing. Neither
# its name nor the work directory's holds "rbdsync": on a shared machine, another test's
# `pkill -f rbdsync` would otherwise stop the server under fio.
RBDSYNC_BIN=""
SERVER_PID=""
SERVER_NAME=""
ORIG_CMDLINE="$0${*:+ $*}"

die() {
    # After an interrupt, cleanup stops the server under a running fio; stay quiet about that.
    if [[ -z $WORK || (-d $WORK && ! -e $WORK/interrupted) ]]; then
        echo "nbd-export.sh: error: $*" >&2
    fi
    exit 1
}

log() {
    echo "[$(date +%H:%M:%S)] $*" >&2
}

# --- cleanup -------------------------------------------------------------------------------

stop_server() {
    local pid=$SERVER_PID
    SERVER_PID=""
    stop_pid "$pid" "$SERVER_NAME" 50
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -gt 128 && -n $WORK && -d $WORK ]]; then
        : >"$WORK/interrupted"
    fi
    stop_server
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 || $rc -eq 1 ]]; then
            # Keep logs for a failed run (not an interrupted one), but free the large files.
            rm -f "$WORK/disk.raw" "$WORK/agent-under-test"
            echo "nbd-export.sh: work directory kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

# --- checks and setup ----------------------------------------------------------------------


check_tools() {
    need fio fio
    need qemu-nbd qemu-utils
    need nbdkit nbdkit
    need python3 python3
    need timeout coreutils
    case " $SERVERS " in *" nbd-server "*) need nbd-server nbd-server ;; esac
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio --enghelp=nbd failed)"
    nbdkit file --version >/dev/null 2>&1 ||
        die "nbdkit has no file plugin; install it with: apt-get install -y nbdkit"
}

check_params() {
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
    [[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer of seconds (got '$RUNTIME')"
    local s
    for s in $SERVERS; do
        case $s in
            rbdsync | qemu-nbd | nbdkit | nbd-server) ;;
            *) die "SERVERS: unknown server '$s' (known: rbdsync qemu-nbd nbdkit nbd-server)" ;;
        esac
    done
}


ensure_rbdsync() {
    if [[ ! -x $RBDSYNC ]]; then
        [[ $RBDSYNC == "$REPO_DIR/target/release/rbdsync" ]] ||
            die "RBDSYNC=$RBDSYNC is not an executable file"
        need cargo cargo
        log "building rbdsync: cargo build --release -p agent"
        (cd "$REPO_DIR" && cargo build --release -p agent) >&2
        [[ -x $RBDSYNC ]] || die "cargo build did not produce $RBDSYNC"
    fi
}

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# wait_ready tcp PORT | unix PATH: waits (10 s at most) until something accepts connections
# there, failing early if the server process has died.
wait_ready() {
    local kind=$1 addr=$2 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null ||
            die "$SERVER_NAME exited during startup; see $WORK/$SERVER_NAME.log: $(tail -n 5 "$WORK/$SERVER_NAME.log")"
        if python3 - "$kind" "$addr" <<'EOF' 2>/dev/null; then
import socket, sys
kind, addr = sys.argv[1], sys.argv[2]
if kind == "tcp":
    s = socket.create_connection(("127.0.0.1", int(addr)), timeout=1)
else:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(1)
    s.connect(addr)
s.close()
EOF
            return 0
        fi
        sleep 0.1
    done
    die "$SERVER_NAME did not accept connections on $kind $addr within 10 s; see $WORK/$SERVER_NAME.log"
}

prefill() {
    local bytes=$1
    log "prefilling $WORK/disk.raw with $((bytes >> 20)) MiB of random data"
    dd if=/dev/urandom of="$WORK/disk.raw" bs=1M count=$((bytes >> 20)) iflag=fullblock \
        conv=fsync status=none
}

write_rbdsync_config() {
    local bytes=$1
    mkdir -p "$WORK/agent/vms.d"
    cat >"$WORK/agent/vms.d/bench.yaml" <<EOF
name: bench
disks:
  - name: disk0
    image: file:$WORK/disk.raw
    size: $bytes
EOF
}

# --- servers -------------------------------------------------------------------------------

# start_server NAME TRANSPORT: starts NAME listening on a fresh port or socket; sets
# SERVER_PID and URI.
start_server() {
    local name=$1 transport=$2 port="" sock=""
    SERVER_NAME=$name
    if [[ $transport == tcp ]]; then
        port=$(free_port)
        URI="nbd://127.0.0.1:$port/$EXPORT"
    else
        sock="$WORK/$name.sock"
        rm -f "$sock"
        URI="nbd+unix:///$EXPORT?socket=$sock"
    fi
    case $name in
        rbdsync)
            # rbdsync listens on both; give it a fresh port anyway so no TIME_WAIT is shared.
            [[ -n $port ]] || port=$(free_port)
            sock="$WORK/agent/nbd.sock"
            [[ $transport == unix ]] && URI="nbd+unix:///$EXPORT?socket=$sock"
            rm -rf "$WORK/agent/state" "$sock" "$WORK/agent/control.sock"
            cat >"$WORK/agent/agent.yaml" <<EOF
state_dir: state
vms_dir: vms.d
nbd:
  listen: ["127.0.0.1:$port", "unix:nbd.sock"]
control:
  listen: ["unix:control.sock"]
EOF
            "$RBDSYNC_BIN" agent --config "$WORK/agent/agent.yaml" >>"$WORK/rbdsync.log" 2>&1 &
            SERVER_PID=$!
            local i
            for ((i = 0; i < 100; i++)); do
                [[ -s $WORK/agent/state/agent.json ]] && break
                kill -0 "$SERVER_PID" 2>/dev/null ||
                    die "rbdsync exited during startup: $(tail -n 5 "$WORK/rbdsync.log")"
                sleep 0.1
            done
            [[ -s $WORK/agent/state/agent.json ]] ||
                die "rbdsync did not write state/agent.json within 10 s; see $WORK/rbdsync.log"
            ;;
        qemu-nbd)
            local listen=(-b 127.0.0.1 -p "$port")
            [[ $transport == unix ]] && listen=(-k "$sock")
            # Defaults otherwise: --cache=writeback (page cache, as tmpfs has no device
            # below it), --aio=threads; -t keeps serving after a client leaves.
            qemu-nbd -f raw -x "$EXPORT" -t -e 16 --cache=writeback --aio=threads \
                "${listen[@]}" "$WORK/disk.raw" >>"$WORK/qemu-nbd.log" 2>&1 &
            SERVER_PID=$!
            ;;
        nbdkit)
            local listen=(-i 127.0.0.1 -p "$port")
            [[ $transport == unix ]] && listen=(-U "$sock")
            nbdkit -f --exit-with-parent -e "$EXPORT" "${listen[@]}" \
                file file="$WORK/disk.raw" >>"$WORK/nbdkit.log" 2>&1 &
            SERVER_PID=$!
            ;;
        nbd-server)
            # It listens on TCP or on a Unix socket (not both with one [generic]), forks a process
            # per client, and daemonizes: its PID comes from the pid file.
            local generic="    listenaddr = 127.0.0.1\n    port = $port"
            [[ $transport == unix ]] && generic="    unixsock = $sock"
            printf '[generic]\n%b\n[%s]\n    exportname = %s\n' "$generic" "$EXPORT" "$WORK/disk.raw" \
                >"$WORK/nbd-server.conf"
            rm -f "$WORK/nbd-server.pid"
            nbd-server -C "$WORK/nbd-server.conf" -p "$WORK/nbd-server.pid" >>"$WORK/nbd-server.log" 2>&1 ||
                die "nbd-server did not start: $(tail -n 5 "$WORK/nbd-server.log")"
            local i
            for ((i = 0; i < 100; i++)); do
                [[ -s $WORK/nbd-server.pid ]] && break
                sleep 0.05
            done
            SERVER_PID=$(cat "$WORK/nbd-server.pid" 2>/dev/null) || die "nbd-server wrote no pid file"
            ;;
    esac
    if [[ $transport == tcp ]]; then
        wait_ready tcp "$port"
    else
        wait_ready unix "$sock"
    fi
}

# --- fio -----------------------------------------------------------------------------------

# Prints the CPU time (user + system, all threads) that the server has used, in clock ticks.
server_ticks() {
    local stat child total t
    stat=$(<"/proc/$SERVER_PID/stat") || die "$SERVER_NAME (pid $SERVER_PID) is gone"
    stat=${stat##*) } # fields from 3 on; comm (field 2) may hold spaces
    local -a f
    read -r -a f <<<"$stat"
    total=$((f[11] + f[12] + f[13] + f[14])) # utime, stime, and of reaped children (nbd-server forks)
    for child in $(pgrep -P "$SERVER_PID" 2>/dev/null); do
        t=$(proc_ticks "$child")
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# run_fio WORKLOAD OUTFILE: runs one fio job against $URI, JSON to OUTFILE; prints the result
# (IOPS for 4K, MiB/s for 1M) and the server's CPU time per unit of it (microseconds per 4K
# op, or per MiB), measured from /proc over the whole fio run.
run_fio() {
    local workload=$1 out=$2 rw bs qd dir ticks0 ticks1 t0 t1
    case $workload in
        randread4k) rw=randread bs=4k qd=16 dir=read ;;
        randwrite4k) rw=randwrite bs=4k qd=16 dir=write ;;
        read1m) rw=read bs=1M qd=4 dir=read ;;
        write1m) rw=write bs=1M qd=4 dir=write ;;
    esac
    ticks0=$(server_ticks)
    t0=$EPOCHREALTIME
    # fio prints "fio: connected to NBD server" on stdout, so the JSON goes to a file.
    if ! timeout $((RUNTIME + RAMP + 60)) fio --name="$workload" --ioengine=nbd --uri="$URI" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --norandommap --randrepeat=0 \
        --output-format=json --output="$out" >"$out.stdout" 2>&1; then
        local why="it is still running"
        kill -0 "$SERVER_PID" 2>/dev/null ||
            why="it is gone (killed from outside?); end of $WORK/$SERVER_NAME.log: $(tail -n 3 "$WORK/$SERVER_NAME.log")"
        die "fio $workload against $SERVER_NAME ($URI) failed: $(tail -n 5 "$out.stdout")
  server $SERVER_NAME (pid $SERVER_PID): $why"
    fi
    t1=$EPOCHREALTIME
    ticks1=$(server_ticks)
    python3 - "$out" "$dir" "$workload" "$((ticks1 - ticks0))" "$(getconf CLK_TCK)" "$t0" "$t1" <<'EOF'
import json, sys
path, direction, workload, ticks, hz, t0, t1 = sys.argv[1:]
cores = int(ticks) / int(hz) / (float(t1) - float(t0))
with open(path) as f:
    text = f.read()
# Anything fio may have put before the JSON object.
doc = json.loads(text[text.index("{"):])
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(f"fio reported error {job['error']} in {path}")
d = job[direction]
if d["io_bytes"] == 0:
    sys.exit(f"fio moved no data in {path}")
rate = d["iops"] if workload.endswith("4k") else d["bw_bytes"] / 1048576
print(f"{rate:.1f} {cores / rate * 1e6:.2f}")
EOF
}

# --- report --------------------------------------------------------------------------------

header() {
    echo "# NBD export benchmark: rbdsync vs qemu-nbd vs nbdkit"
    echo
    echo "- command: \`$ORIG_CMDLINE\` (ROUNDS=$ROUNDS RUNTIME=$RUNTIME SIZE=$SIZE SERVERS=\"$SERVERS\")"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(uname -srm), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [[ -n $RBDSYNC_BIN ]]; then
        echo "- rbdsync: $("$RBDSYNC_BIN" --version 2>/dev/null | head -n1) ($RBDSYNC, $(date -r "$RBDSYNC" -u '+built %Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$RBDSYNC_BIN" | cut -c1-16); git $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_DIR" status --porcelain -- agent proto 2>/dev/null | grep -q . && echo ', agent/ or proto/ differ from HEAD'))"
    fi
    echo "- qemu-nbd: $(qemu-nbd --version | head -n1)"
    echo "- nbdkit: $(nbdkit --version | head -n1)"
    echo "- nbd-server: $(nbd-server -V 2>&1 | head -n1)"
    echo "- fio: $(fio --version) (ioengine=nbd, libnbd; 1 job, 1 connection)"
    echo "- image: $SIZE raw file on tmpfs ($(df -h --output=target "$WORK" | tail -n1 | tr -d ' ')), prefilled with random data"
    echo "- servers: rbdsync agent (file: image); \`qemu-nbd -f raw -t -e 16 --cache=writeback --aio=threads\`; \`nbdkit file\` (default 16 threads); \`nbd-server\` (a process per client, its defaults)"
    echo "- fio: --time_based --runtime=$RUNTIME --ramp_time=$RAMP --norandommap; 4K at iodepth 16 (IOPS), 1M sequential at iodepth 4 (MiB/s)"
    echo "- each cell: median over $ROUNDS rounds; servers run one at a time, interleaved, order rotated per round"
}

# report CSV: prints the Markdown tables (medians of throughput, of server CPU per unit) and
# notes on noise.
report() {
    python3 - "$1" "$SERVERS" <<'EOF'
import csv, statistics, sys
path, servers = sys.argv[1], sys.argv[2].split()
vals, cpus, loads = {}, {}, []
with open(path) as f:
    for r in csv.DictReader(f):
        key = (r["workload"], r["transport"])
        vals.setdefault(key, {}).setdefault(r["server"], []).append(float(r["value"]))
        cpus.setdefault(key, {}).setdefault(r["server"], []).append(float(r["server_cpu_us_per_unit"]))
        loads.append(float(r["load1"]))
names = {"randread4k": ("4K randread QD16", "IOPS", "us/op"), "randwrite4k": ("4K randwrite QD16", "IOPS", "us/op"),
         "read1m": ("1M seq read QD4", "MiB/s", "us/MiB"), "write1m": ("1M seq write QD4", "MiB/s", "us/MiB")}
keys = [(w, t) for w in names for t in ("tcp", "unix") if (w, t) in vals]
peers = [s for s in servers if s != "rbdsync"]
ratios = [("rbdsync", "best")] + [("rbdsync", p) for p in peers] if "rbdsync" in servers and peers else []
med = statistics.median


def spread(v):
    return (max(v) - min(v)) / med(v) if med(v) else 0.0


def table(head, lines):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")


def medians_table(data, unit_index, fmt, with_spread):
    lines, noisy = [], []
    for w, t in keys:
        cell = data[(w, t)]
        m = {s: med(cell[s]) for s in servers if s in cell}
        # The best peer: most throughput, or least CPU per unit.
        there = [m[p] for p in peers if p in m]
        if there:
            m["best"] = max(there) if unit_index == 1 else min(there)
        line = [names[w][0], "TCP" if t == "tcp" else "Unix", names[w][unit_index]]
        line += [fmt.format(m[s]) if s in m else "-" for s in servers]
        line += [f"{m[a] / m[b]:.2f}" if a in m and b in m and m[b] else "-" for a, b in ratios]
        if with_spread:
            sp = {s: spread(cell[s]) for s in servers if s in cell}
            line.append(" / ".join(f"{sp[s] * 100:.0f}%" if s in sp else "-" for s in servers))
            noisy += [f"{s} {line[0]} {line[1]} ({sp[s] * 100:.0f}%)" for s in sp if sp[s] > 0.25]
        lines.append(line)
    head = ["workload", "transport", "unit"] + servers + [f"{a}/{b}" for a, b in ratios]
    if with_spread:
        head.append("spread " + " / ".join(servers))
    table(head, lines)
    return noisy


print("Throughput (median over rounds; higher is better):")
print()
noisy = medians_table(vals, 1, "{:,.0f}", True)
print()
print("Server CPU time per unit of work (user + system, all threads, from /proc over each fio run; "
      "median; lower is better):")
print()
medians_table(cpus, 2, "{:,.1f}", False)
print()
print("- spread = (max - min) / median over the rounds, per server. 1-minute load average after each run: "
      f"min {min(loads):.2f}, median {med(loads):.2f}, max {max(loads):.2f} (fio + one server alone keep it near 2-4).")
if noisy:
    print(f"- noisy (spread > 25%): {', '.join(noisy)}. Other work on the machine, or too few ROUNDS "
          "or too short a RUNTIME; treat those cells with care.")
EOF
}

# --- main ----------------------------------------------------------------------------------

main() {
    check_params
    check_tools
    local bytes
    bytes=$(bytes "$SIZE" SIZE)
    ((bytes > 0 && bytes % (1 << 20) == 0)) || die "SIZE must be a positive multiple of 1 MiB (got $SIZE = $bytes bytes)"
    [[ -d /dev/shm ]] || die "/dev/shm (tmpfs) is missing"
    local avail
    avail=$(df -B1 --output=avail /dev/shm | tail -n1 | tr -d ' ')
    ((avail > bytes + (64 << 20))) || die "/dev/shm has $((avail >> 20)) MiB free; $((bytes >> 20)) MiB + 64 MiB needed"
    case " $SERVERS " in *" rbdsync "*) ensure_rbdsync ;; esac

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d /dev/shm/nbd-export-bench.XXXXXX)
    mkdir -p "$WORK/fio" "$RESULTS_DIR"
    if [[ " $SERVERS " == *" rbdsync "* ]]; then
        RBDSYNC_BIN="$WORK/agent-under-test"
        cp "$RBDSYNC" "$RBDSYNC_BIN"
    fi
    local csv="$WORK/runs.csv"
    echo "round,server,transport,workload,value,server_cpu_us_per_unit,load1" >"$csv"

    local hdr
    hdr=$(header)
    echo "$hdr"
    echo

    prefill "$bytes"
    write_rbdsync_config "$bytes"

    local -a servers
    read -r -a servers <<<"$SERVERS"
    local n=${#servers[@]}
    local total=$((ROUNDS * n * ${#TRANSPORTS[@]} * ${#WORKLOADS[@]})) done_=0
    local round i server transport workload value cpu load
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            # Rotate the server order so no server always runs first (or right after another).
            server=${servers[$(((i + round - 1) % n))]}
            for transport in "${TRANSPORTS[@]}"; do
                start_server "$server" "$transport"
                for workload in "${WORKLOADS[@]}"; do
                    read -r value cpu < <(run_fio "$workload" "$WORK/fio/r$round-$server-$transport-$workload.json") ||
                        die "fio $workload against $server failed (see above)"
                    [[ -n $cpu ]] || die "fio $workload against $server gave no result"
                    kill -0 "$SERVER_PID" 2>/dev/null ||
                        die "$server died during $workload; see $WORK/$server.log"
                    load=$(cut -d' ' -f1 /proc/loadavg)
                    echo "$round,$server,$transport,$workload,$value,$cpu,$load" >>"$csv"
                    done_=$((done_ + 1))
                    log "[$done_/$total] round $round $server $transport $workload: $value (server CPU $cpu us/unit, load $load)"
                done
                stop_server
            done
        done
    done

    local table
    table=$(report "$csv")
    {
        echo "$hdr"
        echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
        echo "$table"
    } >"$RESULTS_DIR/nbd-export.md"
    cp "$csv" "$RESULTS_DIR/nbd-export.csv"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "$table"
    echo
    echo "Written: $RESULTS_DIR/nbd-export.md (raw runs: $RESULTS_DIR/nbd-export.csv)"
}

main "$@"
