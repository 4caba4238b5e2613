#!/usr/bin/env bash
# Runs one cargo-fuzz target for SECONDS (installing cargo-fuzz and the nightly toolchain if
# missing), starting from the seeds in fuzz/seeds/TARGET and keeping what it finds in
# fuzz/corpus/TARGET (git-ignored). Crashes land in fuzz/artifacts/TARGET/.
#   scripts/fuzz.sh TARGET SECONDS [libFuzzer options, e.g. -runs=1000000]
#   scripts/fuzz.sh list
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

target=${1:?usage: scripts/fuzz.sh TARGET SECONDS [libFuzzer options] | list}
if [ "$target" = list ]; then
    sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v wisp-fuzz
    exit 0
fi
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS [libFuzzer options]}
shift 2

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Per target: the largest input worth trying, and the memory cap (the legacy ports' cap
# is what finds a guest-fed queue with no bound).
case $target in
    qcow2_image) opts=(-max_len=131072 -rss_limit_mb=2048) ;;
    qcow2_ops) opts=(-max_len=1024 -rss_limit_mb=2048) ;;
    legacy_ports) opts=(-max_len=8192 -rss_limit_mb=512) ;;
    pvm_decode) opts=(-max_len=256 -rss_limit_mb=512) ;;
    api_http) opts=(-max_len=16384 -rss_limit_mb=512) ;;
    snapshot_file) opts=(-max_len=65536 -rss_limit_mb=1024) ;;
    mmds) opts=(-max_len=8192 -rss_limit_mb=512) ;;
    virtio_*) opts=(-max_len=4096 -rss_limit_mb=1024) ;;
    *) echo "unknown target $target; scripts/fuzz.sh list" >&2; exit 2 ;;
esac

corpus=fuzz/corpus/$target
mkdir -p "$corpus" "fuzz/artifacts/$target"
if [ -d "fuzz/seeds/$target" ]; then
    cp -n fuzz/seeds/"$target"/* "$corpus"/ 2>/dev/null || true
fi
nice -n 10 cargo +nightly fuzz build -O "$target"
exec nice -n 10 "fuzz/target/x86_64-unknown-linux-gnu/release/$target" "$corpus" \
    -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$seconds" -timeout=10 \
    -print_final_stats=1 "${opts[@]}" "$@"
