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
# lists them). Emulation checks results, not speed.
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
  if grep -qw -- "$cpu" <<<"$emulated"; then
    cpus+=("$cpu")
  else
    echo "== aarch64 CPU: $cpu is not one this qemu emulates: skipped" >&2
  fi
done

if [ "${1:-}" != --swarm ]; then
  for cpu in "${cpus[@]}"; do
    echo "== aarch64 CPU: $cpu" >&2
    QEMU_CPU=$cpu cargo test --target "$TARGET" -p pollen-shard --lib --test kernel_paths --release "$@"
  done
  exit 0
fi

cargo build --release --bin pollen
cargo build --release --target "$TARGET" --bin pollen
x86=target/release/pollen
arm=(qemu-aarch64-static -L /usr/aarch64-linux-gnu "target/$TARGET/release/pollen")
dir=$(mktemp -d)
pids=()
stop() {
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  pids=()
}
trap 'stop; rm -rf "$dir"' EXIT
question="Write a short poem about the sea."
$x86 generate --local --chat --max-tokens 96 --prompt "$question" >"$dir/local.txt"
port=39200
for cpu in "${cpus[@]}"; do
  echo "== mixed swarm, aarch64 server on: $cpu" >&2
  boot=/ip4/127.0.0.1/tcp/$port
  $x86 bootstrap --listen "$boot" >"$dir/boot.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do grep -q "$boot/p2p/" "$dir/boot.log" && break; sleep 0.2; done
  addr=$(grep -o "$boot/p2p/[A-Za-z0-9]*" "$dir/boot.log" | head -1)
  $x86 serve --blocks 0:15 --threads 1 --bootstrap "$addr" --no-mdns \
    --listen /ip4/127.0.0.1/tcp/$((port + 1)) --identity "$dir/id-x86-$cpu" >"$dir/x86.log" 2>&1 &
  pids+=($!)
  QEMU_CPU=$cpu "${arm[@]}" serve --blocks 15:30 --threads 1 --bootstrap "$addr" --no-mdns \
    --listen /ip4/127.0.0.1/tcp/$((port + 2)) --identity "$dir/id-arm-$cpu" >"$dir/arm.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    grep -q '^ready' "$dir/x86.log" && grep -q '^ready' "$dir/arm.log" && break
    sleep 1
  done
  grep -h '^ready' "$dir/x86.log" "$dir/arm.log" | sed 's/ peer [^ ]*//; s/ model [^ ]*//' >&2
  $x86 generate --bootstrap "$addr" --no-mdns --chat --max-tokens 96 --verify 0 \
    --prompt "$question" >"$dir/swarm.txt"
  if ! cmp -s "$dir/local.txt" "$dir/swarm.txt"; then
    echo "error: the mixed swarm's answer differs from the local one" >&2
    diff "$dir/local.txt" "$dir/swarm.txt" >&2 || true
    exit 1
  fi
  echo "the answer through x86-64 and aarch64 ($cpu) servers equals the local one" >&2
  stop
  port=$((port + 10))
done
