#!/usr/bin/env bash
# Builds rbdsync and runs the agent in the foreground on its embedded
# default configuration (config.example.yaml): one demo VM disk served from
# a sparse file under /var/lib/rbdsync, no Ceph needed. Debian 12, as root.
# Usage: bash deploy/dev/run-agent.sh [extra agent arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD_PACKAGES=(build-essential pkg-config clang libclang-dev librbd-dev librados-dev)

missing=()
for p in "${BUILD_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    # Debian 12's rustc is too old for the dependencies; use rustup's stable toolchain.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates >/dev/null
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
cargo build --release -p agent
exec target/release/rbdsync agent "$@"
