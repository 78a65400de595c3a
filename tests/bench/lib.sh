# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced; each script defines `die`).

# need COMMAND [PACKAGE]: fails with an install hint unless COMMAND exists.
need() {
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found; install it with: apt-get install -y ${2:-$1}"
}

# bytes VALUE NAME: prints VALUE (bytes, or with K/KiB, M/MiB, G/GiB, T/TiB) in bytes.
bytes() {
    local n mult
    [[ $1 =~ ^([0-9]+)([KMGT]?)(iB)?$ ]] || die "$2: bad size '$1' (e.g. 64KiB, 2GiB, 1073741824)"
    n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
        "") mult=1 ;;
        K) mult=1024 ;;
        M) mult=$((1024 ** 2)) ;;
        G) mult=$((1024 ** 3)) ;;
        T) mult=$((1024 ** 4)) ;;
    esac
    echo $((n * mult))
}

# stop_pid PID WHAT [TENTHS]: SIGTERM to PID (if set and alive), SIGKILL after TENTHS tenths of
# a second (default 100) if it is still there, then reaps it. Only PIDs the script started.
stop_pid() {
    local pid=$1 what=$2 tenths=${3:-100} i
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < tenths; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${0##*/}: $what (pid $pid) ignored SIGTERM for $((tenths / 10)) s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

# proc_ticks PID: user + system clock ticks of PID so far (empty if PID is empty or gone).
proc_ticks() {
    local stat
    [[ -n $1 ]] && stat=$(<"/proc/$1/stat") 2>/dev/null || return 0
    stat=${stat##*) }
    local -a f
    read -r -a f <<<"$stat"
    echo $((f[11] + f[12]))
}

# ticks_s TICKS: clock ticks as seconds (3 decimals).
ticks_s() {
    awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", t / hz}'
}

# agent_yaml DIR [STATE_DIR]: prints the common part of a benchmark agent's agent.yaml: sockets
# DIR/nbd.sock and DIR/control.sock, VM files in DIR/vms.d, state in STATE_DIR (DIR/state).
# Callers append their own sections (ceph:, metrics:).
agent_yaml() {
    cat <<EOF
node: bench
state_dir: ${2:-$1/state}
vms_dir: $1/vms.d
nbd:
  listen: ["unix:$1/nbd.sock"]
control:
  listen: ["unix:$1/control.sock"]
EOF
}
