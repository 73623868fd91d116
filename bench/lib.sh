# Shared by the MNIST experiment scripts under bench/, sourced from the repository's root after
# `set -euo pipefail`: their one option (--data) and help, the data check, and the binary.

# Parses the caller's options: `--data DIR` sets DATA (default: see require_mnist);
# `-h`/`--help` prints the caller's header comment (its lines 2 up to `set -euo`) and exits.
# Usage: mnist_args "$0" "$@"
mnist_args() {
    local script=$1
    shift
    DATA=
    while [ $# -gt 0 ]; do
        case "$1" in
            --data) shift; DATA="$1" ;;
            -h|--help) sed -n '2,/^set -euo/p' "$script" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) echo "$(basename "$script"): unknown option $1 (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
}

# Settles DATA: as given; else ../shared/data/mnist where it exists; else the folder
# `starling data fetch mnist` downloads to (and checks). Stops with a clear message unless it
# is a folder. Call after starling_bin.
# Usage: require_mnist "$0"
require_mnist() {
    if [ -z "$DATA" ]; then
        if [ -d ../shared/data/mnist ]; then
            DATA=../shared/data/mnist
        else
            DATA=$("$STARLING_BIN" data fetch mnist)
        fi
    fi
    if [ ! -d "$DATA" ]; then
        echo "$(basename "$1"): no MNIST folder at $DATA; pass --data DIR (the four IDX files)" >&2
        exit 1
    fi
}

# Sets STARLING_BIN: as given in the environment, or a fresh release build of the CLI.
starling_bin() {
    if [ -z "${STARLING_BIN:-}" ]; then
        cargo build --release --locked -q -p starling-cli
        STARLING_BIN=target/release/starling
    fi
}
