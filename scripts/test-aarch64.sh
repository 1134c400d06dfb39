#!/usr/bin/env bash
# Runs pollen-shard's unit tests for aarch64 on an x86-64 Debian or Ubuntu machine,
# under qemu-user emulation: among them every packed kernel path the emulated CPU
# has against the scalar path, bit for bit, on random data and on the default
# model's shapes, and attention's and the quantizer's loops against theirs; then
# shard/tests/kernel_paths.rs, the real default model's logits on each NEON path
# (it fetches the model where it is missing), bit-identical to each other and near
# exact mode's. Both run on three emulated CPUs: qemu's `max` (every extension qemu
# emulates, `sdot` and `i8mm` among them: both NEON kernels, `neon-dotprod` chosen),
# a Cortex-A72 (Armv8.0, the Raspberry Pi 4's core: no `sdot`, plain `neon` chosen,
# and candle's products that would need it refused) and a Cortex-A76 (`sdot`
# without `i8mm`, the Raspberry Pi 5's core; qemu 7.1 and later), each one this
# qemu emulates; `QEMU_CPU=name` runs one CPU only (`qemu-aarch64-static -cpu help`
# lists them). Last, shard/tests/arithmetic.rs runs tiny models on all three CPUs
# and checks that equal compute-mode names mean equal bits. Emulation checks
# results, not speed.
#
#   bash scripts/test-aarch64.sh [extra `cargo test` arguments]
#   bash scripts/test-aarch64.sh --swarm
#
# `--swarm` instead builds `pollen` for aarch64 and x86-64 (release; the aarch64
# build takes minutes) and runs a mixed swarm on loopback per emulated CPU: an
# x86-64 bootstrap and server of blocks 0:15, an emulated aarch64 server of 15:30,
# and an x86-64 client whose answer must equal `pollen generate --local`'s (the
# fast mode gives the same bits on both architectures).
#
# Needs the Rust target `aarch64-unknown-linux-gnu` (rustup fetches it from
# static.rust-lang.org where it is missing), and Debian's gcc-aarch64-linux-gnu
# (the linker and C runtime) and qemu-user-static, which it installs with apt
# where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q gcc-aarch64-linux-gnu qemu-user-static
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET" || {
    echo "error: the Rust standard library for $TARGET is not installed and rustup could not fetch it" >&2
    exit 1
  }
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
# kernel_paths.rs runs itself again per kernel path: under the same emulator.
export POLLEN_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
emulated=$(qemu-aarch64-static -cpu help || true)  # it lists, then exits non-zero
cpus=()
for cpu in ${QEMU_CPU:-max cortex-a72 cortex-a76}; do
  # A CPU's name, before any `,property=value`.
  if grep -qw -- "${cpu%%,*}" <<<"$emulated"; then
    cpus+=("$cpu")
  else
    echo "== aarch64 CPU: $cpu is not one this qemu emulates: skipped" >&2
  fi
done
if [ ${#cpus[@]} -eq 0 ]; then
  echo "error: none of the CPUs asked for is one this qemu emulates" >&2
  exit 1
fi

if [ "${1:-}" != --swarm ]; then
  for cpu in "${cpus[@]}"; do
    echo "== aarch64 CPU: $cpu" >&2
    QEMU_CPU=$cpu cargo test --target "$TARGET" -p pollen-shard --lib --test kernel_paths --release "$@"
  done
  # Runs its children on each CPU itself, and compares them.
  echo "== aarch64 CPUs compared: equal compute-mode names, equal bits" >&2
  cargo test --target "$TARGET" -p pollen-shard --test arithmetic --release "$@"
  exit 0
fi
if [ $# -gt 1 ]; then
  echo "error: --swarm takes no other arguments" >&2
  exit 2
fi

cargo build --release --bin pollen
cargo build --release --target "$TARGET" --bin pollen
x86=target/release/pollen
arm=(qemu-aarch64-static -L /usr/aarch64-linux-gnu "target/$TARGET/release/pollen")
dir=$(mktemp -d)
pids=()
stop() {
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  pids=()
}
trap stop EXIT
fail() {
  echo "FAIL: $*; logs kept in $dir" >&2
  exit 1
}
# Prints the first line of $1 matching $2 within $3 seconds, while process $4 lives.
wait_line() {
  local log="$1" pattern="$2" limit="$3" pid="$4" line
  for ((i = 0; i < limit * 10; i++)); do
    if line="$(grep -m1 -E "$pattern" "$log" 2>/dev/null)"; then
      printf '%s\n' "$line"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "no line matching '$pattern' in $log:" >&2
  tail -n 20 "$log" >&2
  return 1
}
question="Write a short poem about the sea."
$x86 generate --local --chat --max-tokens 96 --prompt "$question" >"$dir/local.txt" ||
  fail "pollen generate --local"
for cpu in "${cpus[@]}"; do
  echo "== mixed swarm, aarch64 server on: $cpu" >&2
  run="$dir/${cpu%%,*}"
  mkdir -p "$run"
  $x86 bootstrap --no-mdns --identity "$run/boot.key" --listen /ip4/127.0.0.1/tcp/0 \
    >"$run/boot.log" 2>&1 &
  pids+=($!)
  addr=$(wait_line "$run/boot.log" '/ip4/127\.0\.0\.1/tcp/[0-9]+/p2p/' 30 $! |
    grep -oE '/ip4/127\.0\.0\.1/tcp/[0-9]+/p2p/[A-Za-z0-9]+' | head -n1) ||
    fail "the bootstrap printed no address"
  $x86 serve --blocks 0:15 --threads 1 --bootstrap "$addr" --no-mdns \
    --listen /ip4/127.0.0.1/tcp/0 --identity "$run/x86.key" >"$run/x86.log" 2>&1 &
  pids+=($!)
  x86_pid=$!
  QEMU_CPU=$cpu "${arm[@]}" serve --blocks 15:30 --threads 1 --bootstrap "$addr" --no-mdns \
    --listen /ip4/127.0.0.1/tcp/0 --identity "$run/arm.key" >"$run/arm.log" 2>&1 &
  pids+=($!)
  wait_line "$run/x86.log" '^ready' 120 $x86_pid >/dev/null || fail "the x86-64 server did not start"
  wait_line "$run/arm.log" '^ready' 300 $! >/dev/null || fail "the aarch64 server did not start"
  grep -h '^ready' "$run/x86.log" "$run/arm.log" | sed 's/ peer [^ ]*//; s/ model [^ ]*//' >&2
  $x86 generate --bootstrap "$addr" --no-mdns --chat --max-tokens 96 --verify 0 \
    --prompt "$question" >"$run/swarm.txt" 2>"$run/client.log" ||
    fail "generation through the mixed swarm: $(tail -n 3 "$run/client.log")"
  if ! cmp -s "$dir/local.txt" "$run/swarm.txt"; then
    diff "$dir/local.txt" "$run/swarm.txt" >&2 || true
    fail "the mixed swarm's answer differs from the local one"
  fi
  echo "the answer through x86-64 and aarch64 ($cpu) servers equals the local one" >&2
  stop
done
rm -rf "$dir"
