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
for cpu in ${QEMU_CPU:-max cortex-a72 cortex-a76}; do
  if ! grep -qw -- "$cpu" <<<"$emulated"; then
    echo "== aarch64 CPU: $cpu is not one this qemu emulates: skipped" >&2
    continue
  fi
  echo "== aarch64 CPU: $cpu" >&2
  QEMU_CPU=$cpu cargo test --target "$TARGET" -p pollen-shard --lib --test kernel_paths --release "$@"
done
