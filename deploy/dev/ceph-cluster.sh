#!/usr/bin/env bash
# Throw-away single-node Ceph (Pacific) for development and tests:
# one monitor + one memstore OSD, cephx on, msgr2 only, bound to 127.0.0.1.
# Everything lives under DIR; several clusters (different DIRs) can coexist.
#
#   ceph-cluster.sh up DIR      start (idempotent), create pools rbd + backup
#   ceph-cluster.sh down DIR    stop this DIR's daemons (idempotent)
#   ceph-cluster.sh status DIR  show daemon state and `ceph -s`
#
# Env: CEPH_MEMSTORE_BYTES  memstore size (default 8 GiB; past it IO blocks)
# Clients need only the conf: rbd -c DIR/ceph.conf ls, or librados with
# conf=DIR/ceph.conf and client=admin.  No mgr: never call `ceph osd df` or
# `ceph pg stat` against this cluster, they hang.
set -euo pipefail

MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-$((8 << 30))}
CLI_TIMEOUT=20
# Ceph silently falls back to its 1 GiB default on a bad value ("8GiB").
[[ $MEMSTORE_BYTES =~ ^[0-9]+[KMGT]?$ ]] \
    || { echo "CEPH_MEMSTORE_BYTES must be bytes or e.g. 8G" >&2; exit 2; }

die() { echo "ceph-cluster: error: $*" >&2; exit 1; }
log() { echo "ceph-cluster: $*" >&2; }

# Every CLI call gets a hard timeout: without a quorum the tools wait forever.
ceph_() { timeout "$CLI_TIMEOUT" ceph -c "$CONF" --connect-timeout 10 "$@"; }
rbd_() { timeout "$CLI_TIMEOUT" rbd -c "$CONF" "$@"; }

# Print the tail of a daemon log (for failure messages).
show_log() {
    local f
    for f in "$DIR/log/$1.stderr" "$DIR/log/ceph-$1.log"; do
        [[ -s $f ]] && { echo "--- tail of $f:" >&2; tail -n 30 "$f" >&2; }
    done
    return 0
}

# PID of a running daemon ($1 = mon.a | osd.0) or nothing. A PID file alone
# is not proof: PIDs wrap, and a dying daemon's cmdline goes empty, so
# require that /proc/PID/cmdline still names this DIR's conf.
daemon_pid() {
    local pid
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $CONF " \
        && echo "$pid"
    return 0
}

# True while PID runs. A zombie counts as gone: PID 1 here reaps orphans
# only every second or so, and a zombie holds no ports or files.
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st%% *} != Z ]]
}

port_busy() { [[ -n $(ss -Htan "sport = :$1") ]]; }

# A random free port (below the ephemeral range so outgoing connections
# never take it) whose successors up to +$1-1 are free as well.
pick_ports() {
    local n=$1 base i
    for _ in $(seq 200); do
        base=$((10000 + RANDOM % 20000))
        for ((i = 0; i < n; i++)); do port_busy $((base + i)) && continue 2; done
        echo "$base"; return 0
    done
    die "no free port range of $n found"
}

write_conf() {
    local mon_port=$1 osd_port=$2
    cat >"$CONF" <<EOF
[global]
fsid = $(cat /proc/sys/kernel/random/uuid)
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $DIR/run
crash_dir = $DIR/crash
# Single OSD: size-1 pools, no host-level failure domain, few PGs.
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
# Clone v2 (no snapshot protect) needs mimic+ clients.
mon_osd_initial_require_min_compat_client = mimic
rbd_default_features = 61
# Expected in this setup; keep ceph health at HEALTH_OK.
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false

[mon]
mon_data = $DIR/mon.\$id
keyring = $DIR/mon.\$id/keyring
# Default paxos pacing makes every map change take ~1 s.
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# Default is /var/log/ceph/...: keep the cluster + audit logs in DIR too.
mon_cluster_log_file = default=$DIR/log/ceph.\$channel.log cluster=$DIR/log/ceph.log

[osd]
osd_data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
osd_objectstore = memstore
memstore_device_bytes = $MEMSTORE_BYTES
memstore_page_set = true
osd_fast_shutdown = true
osd_fast_shutdown_notify_mon = false
ms_bind_port_min = $osd_port
ms_bind_port_max = $((osd_port + 19))

# Daemon-only paths: clients using this conf must not share one socket/log.
[mon.a]
log_file = $DIR/log/ceph-mon.a.log
admin_socket = $DIR/run/mon.a.asok
pid_file = $DIR/run/mon.a.pid
[osd.0]
log_file = $DIR/log/ceph-osd.0.log
admin_socket = $DIR/run/osd.0.asok
pid_file = $DIR/run/osd.0.pid

[client]
keyring = $DIR/client.admin.keyring
EOF
}

# Monitor "a": keys, monmap, mkfs, start (ceph-mon daemonizes itself, writes
# its pid file and returns only once it is running, or fails). Daemons get
# started with our lock fds 8/9 closed, else they would hold the locks forever.
start_mon() {
    # The mon key must live outside mon.a/ before mkfs: mkfs silently does
    # nothing (exit 0) when the data dir is not empty; it copies the keyring in.
    local port=$1 key="$DIR/mon.keyring"
    ceph-authtool "$key" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/client.admin.keyring" --create-keyring --gen-key \
        -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$key" --import-keyring "$DIR/client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$(awk '$1 == "fsid" {print $3}' "$CONF")" \
        --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null || die "monmaptool failed"
    ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$key" \
        2>>"$DIR/log/mon.a.stderr" || { show_log mon.a; die "ceph-mon --mkfs failed"; }
    ceph-mon -c "$CONF" -i a 2>>"$DIR/log/mon.a.stderr" 8<&- 9<&- \
        || { show_log mon.a; die "ceph-mon failed to start"; }
}

# OSD 0: register it with its cephx key, mkfs, start, wait until up + in.
start_osd() {
    local uuid key i
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    mkdir -p "$DIR/osd.0"
    printf '[osd.0]\n\tkey = %s\n' "$key" >"$DIR/osd.0/keyring"
    printf '{"cephx_secret": "%s"}\n' "$key" >"$DIR/osd.0/secrets.json"
    ceph_ osd new "$uuid" 0 -i "$DIR/osd.0/secrets.json" >/dev/null \
        || { show_log mon.a; die "'ceph osd new' failed (monitor not answering?)"; }
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>>"$DIR/log/osd.0.stderr" \
        || { show_log osd.0; die "ceph-osd --mkfs failed"; }
    ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd.0.stderr" 8<&- 9<&- \
        || { show_log osd.0; die "ceph-osd failed to start"; }
    for ((i = 0; i < 300; i++)); do
        ceph_ osd dump -f json 2>/dev/null | grep -q '"osd":0,"uuid":"[^"]*","up":1,"in":1' \
            && return 0
        [[ -n $(daemon_pid osd.0) ]] || { show_log osd.0; die "ceph-osd died"; }
        sleep 0.1
    done
    show_log osd.0; die "osd.0 not up+in after 30 s"
}

create_pool() {
    ceph_ osd pool create "$1" 8 8 >/dev/null 2>&1 || { show_log mon.a; die "creating pool $1 failed"; }
    rbd_ pool init "$1" || { show_log osd.0; die "rbd pool init $1 failed"; }
}

cmd_up() {
    local mon osd mon_port osd_port
    mon=$(daemon_pid mon.a); osd=$(daemon_pid osd.0)
    if [[ -n $mon && -n $osd ]]; then
        rbd_ ls >/dev/null || die "daemons run in $DIR but 'rbd ls' fails; run down + up"
        echo "ceph cluster already up: conf=$CONF"; return 0
    fi
    [[ -z $mon && -z $osd ]] || die "cluster in $DIR half running; run '$0 down $DIR' first"
    # Memstore data died with the old OSD: start from scratch (our files only).
    rm -rf "$DIR/mon.a" "$DIR/osd.0" "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/monmap" \
        "$DIR/mon.keyring" "$CONF" "$DIR/client.admin.keyring"
    mkdir -p "$DIR/run" "$DIR/log"
    # On any failure from here on, stop what we started (logs stay in DIR/log)
    # so that the next `up` starts clean instead of finding a half cluster.
    trap 'rc=$?; if ((rc)); then log "up failed, stopping daemons"; cmd_down >/dev/null; fi' EXIT
    # Serialize port choice + bind with other instances of this script (lock
    # on the script file itself, so no file is created outside DIR).
    exec 9<"${BASH_SOURCE[0]}"
    flock -w 60 9 || die "timed out waiting for the port lock"
    mon_port=$(pick_ports 1)
    osd_port=$(pick_ports 20)
    while ((mon_port >= osd_port && mon_port < osd_port + 20)); do mon_port=$(pick_ports 1); done
    write_conf "$mon_port" "$osd_port"
    start_mon "$mon_port"
    start_osd
    flock -u 9
    ceph_ health mute MGR_DOWN >/dev/null 2>&1 || true  # no mgr, by design
    create_pool rbd
    create_pool backup
    rbd_ ls >/dev/null || die "'rbd ls' fails after setup"
    trap - EXIT
    echo "ceph cluster up: conf=$CONF"
}

# Stop one daemon by its pid file: TERM, wait, KILL after a short grace.
stop_daemon() {
    local pid i
    pid=$(daemon_pid "$1")
    [[ -n $pid ]] || { rm -f "$DIR/run/$1.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    # Poll the PID itself, not the cmdline check: a dying daemon's cmdline
    # is empty (zombie) before it is reaped.
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
        log "$1 (pid $pid) still alive after 2.5 s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.05; done
    fi
    rm -f "$DIR/run/$1.pid"
}

cmd_down() {
    stop_daemon osd.0   # OSD first: with the mon gone it would hang on exit
    stop_daemon mon.a
    echo "ceph cluster down: $DIR"
}

cmd_status() {
    local d pid rc=0
    for d in mon.a osd.0; do
        pid=$(daemon_pid "$d")
        if [[ -n $pid ]]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
    done
    if ((rc == 0)); then ceph_ -s || rc=1; fi
    return "$rc"
}

usage() { echo "usage: $0 up|down|status DIR" >&2; exit 2; }

(($# == 2)) || usage
[[ $1 == up ]] && mkdir -p "$2"
if [[ ! -d $2 ]]; then
    [[ $1 == down ]] && exit 0   # nothing was ever started there
    die "no such directory: $2"
fi
DIR=$(cd "$2" && pwd -P)
[[ $DIR != *[[:space:]]* ]] || die "DIR must not contain whitespace (ceph.conf lists)"
CONF="$DIR/ceph.conf"
# One up/down at a time per DIR (a directory can be flock'ed too).
exec 8<"$DIR"
[[ $1 == status ]] || flock -w 120 8 || die "another up/down on $DIR is still running"
case $1 in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
