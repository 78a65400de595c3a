#!/usr/bin/env bash
# Runs the whole rbdsync test suite on a Debian 12 machine (as root):
# installs what the tests need, starts a throw-away Ceph cluster on
# loopback, builds once in release, runs every test, then the lints.
# Usage: bash tests/run.sh            (CI runs exactly this via .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-utils libnbd-bin python3-libnbd nbdkit fio jq curl openssl python3-venv
          clang libclang-dev librbd-dev librados-dev ceph-mon ceph-osd ceph-common prometheus systemd
          python3-fusepy linux-image-amd64 busybox-static nbd-client seabios ipxe-qemu
          libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libibverbs1 libjpeg62-turbo libnuma1
          libpixman-1-0 libpmem1 librdmacm1 libsasl2-2 libseccomp2 libslirp0 liburing2 libvdeplug2)

# QEMU for the guest tests (tests/tests/vm_migration.rs): Debian's qemu-system-x86, unpacked
# under target/ instead of installed, because installing it would replace the machine's newer
# qemu-utils (see NOTES: 7.2 vs the 10.0 backport); its libraries are in PACKAGES.
QEMU_ROOT="$(pwd)/${CARGO_TARGET_DIR:-target}/qemu-system"

# schemathesis (PyPI) for tests/tests/schemathesis.rs, pinned, in a virtualenv
# of the system python3 where that test looks for it.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV="${CARGO_TARGET_DIR:-target}/schemathesis-venv"

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "== installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [[ "$("$SCHEMATHESIS_VENV/bin/schemathesis" --version 2>/dev/null)" != *"version $SCHEMATHESIS_VERSION" ]]; then
        echo "== installing: schemathesis $SCHEMATHESIS_VERSION in $SCHEMATHESIS_VENV"
        /usr/bin/python3 -m venv --clear "$SCHEMATHESIS_VENV"
        "$SCHEMATHESIS_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    fi
}

unpack_qemu() {
    if [[ ! -x "$QEMU_ROOT/usr/bin/qemu-system-x86_64" ]]; then
        echo "== unpacking qemu-system-x86 into $QEMU_ROOT"
        local debs
        debs=$(mktemp -d)
        (cd "$debs" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data)
        for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$QEMU_ROOT"; done
        rm -rf "$debs"
    fi
    export RBDSYNC_QEMU_ROOT="$QEMU_ROOT"
    "$QEMU_ROOT/usr/bin/qemu-system-x86_64" -version | head -1
}

CEPH_DIR=""
start_ceph() {
    CEPH_DIR=$(mktemp -d /tmp/rbdsync-ceph.XXXXXX)
    echo "== starting Ceph test cluster in $CEPH_DIR"
    deploy/dev/ceph-cluster.sh up "$CEPH_DIR"
    export RBDSYNC_TEST_CEPH_CONF="$CEPH_DIR/ceph.conf"
}

stop_ceph() {
    if [[ -n "$CEPH_DIR" ]]; then
        deploy/dev/ceph-cluster.sh down "$CEPH_DIR" || true
        rm -rf "$CEPH_DIR"
    fi
}

main() {
    local start=$SECONDS
    install_packages
    unpack_qemu
    trap stop_ceph EXIT
    start_ceph
    echo "== build (release)"
    cargo build --release --workspace --all-targets
    echo "== tests"
    cargo test --release --workspace -- --test-threads="${TEST_THREADS:-4}"
    echo "== lints"
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings
    echo "== all tests passed in $((SECONDS - start)) s"
}

main "$@"
