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
