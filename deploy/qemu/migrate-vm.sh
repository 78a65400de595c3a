#!/usr/bin/env bash
# Live-migrates a running QEMU VM whose disks are rbdsync exports, together
# with its disks: rbdsync mirrors the disks, QEMU moves RAM and CPU state,
# and the disks switch over at the moment the VM stops on the source.
#
# Usage:
#   migrate-vm.sh --vm VM --to DEST_CONTROL --src-qmp SOCKET --dst-qmp SOCKET \
#                 --uri MIGRATION_URI [--cutover manual|first-io] [--control SRC_CONTROL]
#
#   --vm        the VM's name in rbdsync (its VM file on the source agent)
#   --to        the destination agent's control address (unix:PATH or https://HOST:PORT)
#   --src-qmp   QMP socket of the running source QEMU
#   --dst-qmp   QMP socket of the destination QEMU, started with `-incoming defer` and
#               the same devices; its disks open the same export names on its own agent,
#               which serves them only once the migration is ready: so either pass
#   --dst-qemu  the command that starts it (run in the background once the disks are ready;
#               the script then waits for --dst-qmp), or run `rbdsync migrate VM --to DEST
#               --cutover MODE` yourself, start the destination QEMU, then this script (it
#               finds the migration ready and goes on from there)
#   --uri       QEMU migration URI the destination listens on (tcp:HOST:PORT, unix:PATH)
#   --cutover   manual (default): QEMU pauses before switch-over (capability
#               pause-before-switchover), `rbdsync migration cutover` switches the disks
#               while the VM is stopped, then QEMU completes. first-io: the destination
#               agent switches the disks on the VM's first write there.
#   --control   the source agent's control address (default: rbdsync's default)
#
# On any failure before the switch-over the QEMU migration is cancelled and the rbdsync
# migration aborted: the VM goes on running on the source. Prints the downtime (QEMU's,
# and the disks') at the end. Needs python3 (for QMP) and rbdsync.
set -euo pipefail

vm="" to="" src_qmp="" dst_qmp="" uri="" cutover="manual" control=() dst_qemu=
while (($#)); do
    case "$1" in
        --vm) vm=$2; shift 2 ;;
        --to) to=$2; shift 2 ;;
        --src-qmp) src_qmp=$2; shift 2 ;;
        --dst-qmp) dst_qmp=$2; shift 2 ;;
        --dst-qemu) dst_qemu=$2; shift 2 ;;
        --uri) uri=$2; shift 2 ;;
        --cutover) cutover=$2; shift 2 ;;
        --control) control=(--control "$2"); shift 2 ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "migrate-vm.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for v in vm to src_qmp dst_qmp uri; do
    [[ -n "${!v}" ]] || { echo "migrate-vm.sh: --${v//_/-} is required" >&2; exit 2; }
done
[[ "$cutover" == manual || "$cutover" == first-io ]] || { echo "migrate-vm.sh: --cutover manual|first-io" >&2; exit 2; }
RBDSYNC=${RBDSYNC:-rbdsync}

say() { echo "migrate-vm: $*" >&2; }

# qmp SOCKET COMMAND [ARGS-JSON]: runs one QMP command, prints its "return" as JSON.
qmp() {
    python3 - "$1" "$2" "${3:-{\}}" <<'PY'
import json, socket, sys
path, command, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rw")
def send(cmd, arguments=None):
    msg = {"execute": cmd}
    if arguments:
        msg["arguments"] = arguments
    f.write(json.dumps(msg) + "\n"); f.flush()
    while True:
        line = f.readline()
        if not line:
            sys.exit(f"QMP {cmd}: connection closed")
        r = json.loads(line)
        if "event" in r or "QMP" in r:
            continue
        if "error" in r:
            sys.exit(f"QMP {cmd}: {r['error'].get('desc', r['error'])}")
        return r.get("return")
f.readline()  # greeting
send("qmp_capabilities")
print(json.dumps(send(command, args)))
PY
}

# wait_qemu STATUS...: polls query-migrate on the source until one of STATUS; fails on failed/cancelled.
wait_qemu() {
    local status
    while true; do
        status=$(qmp "$src_qmp" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status", "none"))')
        for want in "$@"; do [[ "$status" == "$want" ]] && return 0; done
        case "$status" in failed|cancelled) say "QEMU migration $status"; return 1 ;; esac
        sleep 0.05
    done
}

switched=false
rollback() {
    if ! $switched; then
        say "rolling back: cancelling QEMU's migration, aborting rbdsync's"
        qmp "$src_qmp" migrate_cancel >/dev/null 2>&1 || true
        "$RBDSYNC" "${control[@]}" migration abort "$vm" >&2 || true
    fi
}
trap 'rollback' ERR

state=$("$RBDSYNC" "${control[@]}" --json migration show "$vm" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null || echo none)
if [[ "$state" == ready ]]; then
    say "the disks of $vm are ready already"
else
    say "mirroring the disks of $vm to $to (cut-over: $cutover)"
    "$RBDSYNC" "${control[@]}" migrate "$vm" --to "$to" --cutover "$cutover" >&2
fi
if [[ -n "$dst_qemu" ]]; then
    say "starting the destination QEMU"
    bash -c "$dst_qemu" >&2 &
    for _ in $(seq 300); do [[ -S "$dst_qmp" ]] && break; sleep 0.1; done
fi
qmp "$dst_qmp" migrate-incoming "{\"uri\": \"$uri\"}" >/dev/null
if [[ "$cutover" == manual ]]; then
    qmp "$src_qmp" migrate-set-capabilities \
        '{"capabilities": [{"capability": "pause-before-switchover", "state": true}]}' >/dev/null
fi
say "migrating RAM and CPU state to $uri"
qmp "$src_qmp" migrate "{\"uri\": \"$uri\"}" >/dev/null
if [[ "$cutover" == manual ]]; then
    wait_qemu pre-switchover
    say "source VM stopped: switching the disks over"
    "$RBDSYNC" "${control[@]}" migration cutover "$vm" >&2
    switched=true
    qmp "$src_qmp" migrate-continue '{"state": "pre-switchover"}' >/dev/null
fi
wait_qemu completed
switched=true
if [[ "$cutover" == first-io ]]; then
    # The destination switches the disks on the resumed VM's first write.
    for _ in $(seq 300); do
        state=$("$RBDSYNC" "${control[@]}" --json migration show "$vm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
        [[ "$state" == ready || "$state" == cutting-over ]] || break
        sleep 0.1
    done
fi
"$RBDSYNC" "${control[@]}" migration show "$vm" >&2 || true
downtime=$(qmp "$src_qmp" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("downtime", "?"))')
say "done: QEMU downtime ${downtime} ms (the disks' switch-over is in 'migration show' above)"
