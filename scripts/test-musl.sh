#!/usr/bin/env bash
# Checks that a static musl build of Pollen names its compute modes apart from
# this machine's glibc build where its C library's mathematics differ: builds
# shard/tests/arithmetic.rs for x86_64-unknown-linux-musl (Rust's musl target
# brings its own C library; no C compiler is needed), then runs that test here
# with the musl build as one more child. musl's `sinf` and `cosf` give other bits
# than glibc's in rope tables, so the musl child's names must carry a `-libm…`
# part, and it must compute other bits than glibc's somewhere (see the test's
# documentation). A few minutes: one debug build of pollen-shard for musl.
#
#   bash scripts/test-musl.sh [extra `cargo test` arguments]
#
# Needs the Rust target x86_64-unknown-linux-musl (rustup fetches it from
# static.rust-lang.org where it is missing), on an x86-64 Linux machine.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
if [ "$(uname -m)" != x86_64 ]; then
  echo "error: the musl build runs natively on x86-64 only" >&2
  exit 1
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET" || {
    echo "error: the Rust standard library for $TARGET is not installed and rustup could not fetch it" >&2
    exit 1
  }
fi
echo "== building shard/tests/arithmetic.rs for $TARGET" >&2
musl=$(cargo test -p pollen-shard --test arithmetic --target "$TARGET" --no-run \
  --message-format=json-render-diagnostics |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "arithmetic" and m.get("executable"):
        print(m["executable"])')
if [ -z "$musl" ] || [ ! -x "$musl" ]; then
  echo "error: cargo named no musl build of the arithmetic test" >&2
  exit 1
fi
echo "== this machine's build and $musl compared: equal compute-mode names, equal bits" >&2
POLLEN_ARITHMETIC_PROMPT=${POLLEN_ARITHMETIC_PROMPT:-200} POLLEN_ARITHMETIC_BUILDS="$musl" cargo test -p pollen-shard --test arithmetic "$@" -- --nocapture
