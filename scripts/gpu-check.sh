#!/usr/bin/env bash
# Checks a `--features cuda` build on a machine with an NVIDIA GPU:
#
#   1. the engine bench on the GPU: prefill and decode against
#      candle-transformers on the same GPU, and each weight mode's logits
#      against exact mode on the CPU (`engine-bench --device cuda`);
#   2. `pollen generate --local` on the GPU in exact and fast mode, beside the
#      CPU's text in the same mode (how many words agree is printed; GPU and CPU
#      arithmetic differ in rounding, so they need not be equal);
#   3. a bootstrap and two servers on the GPU (blocks 0:15 and 15:30) on
#      127.0.0.1: text through the swarm must equal the GPU's local text, one
#      client and then five at once (a server batches up to four sessions' decode
#      steps on a GPU; how many it did is printed from its metrics). This is the
#      check that fails the script.
#      Both servers must announce one compute mode, on a GPU of the form
#      exact/cuda-sm<arch>-<SMs>-<hash>. Then decode through that swarm against
#      local decode on the GPU is printed ($GPU_CHECK_SPEED_TOKENS tokens, 256), and
#      $GPU_CHECK_SPEED_CLIENTS (8) clients' decode at once against one client's.
#
#   bash scripts/build-cuda.sh --bench     # builds both binaries
#   bash scripts/gpu-check.sh [POLLEN [ENGINE_BENCH]]
#
# Defaults: target/cuda/release/pollen and target/cuda/release/engine-bench.
# The model is the default one in $POLLEN_CACHE_DIR (fetched if absent, which
# needs pip and the network). Logs go to $GPU_CHECK_DIR (default a temp folder).
# GPU_CHECK_DEVICE (default cuda) runs the same checks on another device, `cpu`
# included, to try the script on a machine without a GPU; GPU_CHECK_BENCH=0 skips
# the bench.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pollen="${1:-$repo/target/cuda/release/pollen}"
bench="${2:-$repo/target/cuda/release/engine-bench}"
dir="${GPU_CHECK_DIR:-$(mktemp -d)}"
mkdir -p "$dir"
tokens="${GPU_CHECK_TOKENS:-96}"
speed_tokens="${GPU_CHECK_SPEED_TOKENS:-256}"
speed_clients="${GPU_CHECK_SPEED_CLIENTS:-8}"
clients="${GPU_CHECK_CLIENTS:-5}"
spans=(0:15 15:30)
metrics=(127.0.0.1:39461 127.0.0.1:39462)
declare -A speed
device="${GPU_CHECK_DEVICE:-cuda}"
prompt="Explain in three sentences how bees make honey."

say() { printf 'gpu-check: %s\n' "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

for exe in "$pollen" "$bench"; do
  [[ -x "$exe" ]] || fail "$exe is missing (bash scripts/build-cuda.sh --bench builds it)"
done
if [[ "$device" != cpu ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 ||
    fail "nvidia-smi found no GPU"
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Waits up to $3 seconds for a line matching $2 in log file $1; prints it.
wait_line() {
  local log="$1" pattern="$2" limit="$3" line
  for ((i = 0; i < limit * 10; i++)); do
    if line="$(grep -m1 -E "$pattern" "$log" 2>/dev/null)"; then
      printf '%s\n' "$line"
      return 0
    fi
    sleep 0.1
  done
  say "no line matching '$pattern' in $log after ${limit}s:"
  tail -n 20 "$log" >&2
  return 1
}

# Decode steps and passes over the weights from a server's metrics at $1.
batches() {
  python3 - "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
v = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
     if l.startswith("pollen_batch_steps_sum") or l.startswith("pollen_batch_steps_count")}
steps, passes = v.get("pollen_batch_steps_sum", 0), v.get("pollen_batch_steps_count", 0)
if passes:
    print(f"{steps:.0f} decode steps in {passes:.0f} passes over its weights"
          f" (mean batch {steps / passes:.2f})")
else:
    print("its decode steps one at a time (none went through the batch queue)")
PY
}

# $1 / $2, as a ratio ("n/a" where either is not a number).
ratio() {
  python3 - "$1" "$2" <<'PY'
import sys
try:
    print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")
except (ValueError, ZeroDivisionError):
    print("n/a")
PY
}

# The decode tokens/s `generate --stats` printed into the logs "$@", added up ("n/a":
# none printed).
rates() {
  { cat "$@" 2>/dev/null || true; } | python3 -c '
import re, sys
r = [float(x) for x in re.findall(r"generated \d+ tokens at ([0-9.]+)", sys.stdin.read())]
print(f"{sum(r):.1f}" if r else "n/a")'
}

# Words of $1 and $2 that agree before the first difference, of $2's count.
agree() {
  python3 - "$1" "$2" <<'PY'
import sys
a, b = sys.argv[1].split(), sys.argv[2].split()
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"{n} of {len(b)} words")
PY
}

if [[ "${GPU_CHECK_BENCH:-1}" == 1 ]]; then
  say "1/3 engine bench on the GPU"
  "$bench" --device "$device" --rounds "${GPU_CHECK_ROUNDS:-3}" | tee "$dir/engine.md"
else
  say "1/3 engine bench skipped (GPU_CHECK_BENCH=0)"
fi

gen() { "$pollen" generate --prompt "$prompt" --chat --max-tokens "$tokens" "$@"; }

# $speed_tokens tokens of a story (no chat template, so the answer runs its length) in
# the current $mode on $device, through "${@:2}", with `--stats` into log $1.
story() {
  local log="$1"
  shift
  "$pollen" generate --prompt "Once upon a time" --max-tokens "$speed_tokens" --stats \
    --device "$device" --weights "$mode" "$@" >/dev/null 2>"$log"
}

say "2/3 local generation, GPU beside CPU"
declare -A local_gpu
for mode in exact fast; do
  local_gpu[$mode]="$(gen --local --device "$device" --weights "$mode" 2>"$dir/local-gpu-$mode.log")" ||
    fail "pollen generate --local --device $device --weights $mode: $(tail -n 5 "$dir/local-gpu-$mode.log")"
  [[ -n "${local_gpu[$mode]// /}" ]] || fail "empty answer on the GPU in $mode mode"
  cpu="$(gen --local --device cpu --weights "$mode" 2>/dev/null)"
  say "$mode mode: GPU answer agrees with the CPU's for $(agree "${local_gpu[$mode]}" "$cpu")"
  printf '%s\n' "${local_gpu[$mode]}" >"$dir/local-gpu-$mode.txt"
  printf '%s\n' "$cpu" >"$dir/local-cpu-$mode.txt"
done
say "GPU answer (exact): ${local_gpu[exact]}"

say "3/3 a swarm of two GPU servers"
"$pollen" bootstrap --no-mdns --listen /ip4/127.0.0.1/tcp/0 \
  --identity "$dir/bootstrap.key" >"$dir/bootstrap.log" 2>&1 &
pids+=($!)
boot="$(wait_line "$dir/bootstrap.log" '/ip4/127\.0\.0\.1/tcp/[0-9]+/p2p/' 30 |
  grep -oE '/ip4/127\.0\.0\.1/tcp/[0-9]+/p2p/[A-Za-z0-9]+' | head -n1)"
[[ -n "$boot" ]] || fail "the bootstrap printed no address"
for mode in exact fast; do
  for i in 0 1; do
    span="${spans[$i]}"
    "$pollen" serve --device "$device" --weights "$mode" --blocks "$span" --no-mdns \
      --bootstrap "$boot" --listen /ip4/127.0.0.1/tcp/0 --metrics "${metrics[$i]}" \
      --identity "$dir/server-$mode-${span/:/-}.key" \
      >"$dir/server-$mode-${span/:/-}.log" 2>&1 &
    pids+=($!)
  done
  names=()
  for span in "${spans[@]}"; do
    ready="$(wait_line "$dir/server-$mode-${span/:/-}.log" 'ready' 120)"
    printf '%s\n' "$ready" >&2
    names+=("$(grep -oE 'compute [^ ]+' <<<"$ready" | cut -d' ' -f2)")
  done
  # A GPU's mode names its architecture, its SMs and a hash of its libraries.
  if [[ "$device" == cuda* ]]; then
    [[ "${names[0]}" =~ ^exact/cuda-sm[0-9]+-[0-9]+-[0-9a-f]{6}$ ]] ||
      fail "$mode mode: the server announces compute mode '${names[0]}'"
  fi
  [[ "${names[0]}" == "${names[1]}" ]] ||
    fail "$mode mode: two servers on one GPU announce '${names[0]}' and '${names[1]}'"
  say "$mode mode: both servers announce compute mode ${names[0]}"
  swarm="$(gen --no-mdns --bootstrap "$boot" --device "$device" --weights "$mode" 2>"$dir/swarm-$mode.log")" ||
    fail "generation through the GPU swarm ($mode): $(tail -n 5 "$dir/swarm-$mode.log")"
  [[ "$swarm" == "${local_gpu[$mode]}" ]] ||
    fail "$mode mode: swarm text differs from local GPU text ($(agree "$swarm" "${local_gpu[$mode]}") agree)"
  say "$mode mode: one client through the GPU swarm: text equals the local GPU text"
  # Clients at once: each answer must still equal the local one.
  cpids=()
  for c in $(seq "$clients"); do
    gen --no-mdns --bootstrap "$boot" --device "$device" --weights "$mode" \
      >"$dir/swarm-$mode-$c.txt" 2>"$dir/swarm-$mode-$c.log" &
    cpids+=($!)
  done
  for c in $(seq "$clients"); do
    wait "${cpids[$((c - 1))]}" || fail "client $c of $clients failed: $(tail -n 5 "$dir/swarm-$mode-$c.log")"
    [[ "$(cat "$dir/swarm-$mode-$c.txt")" == "${local_gpu[$mode]}" ]] ||
      fail "$mode mode: client $c of $clients got other text than the local GPU text"
  done
  say "$mode mode: $clients clients at once through the GPU swarm: all equal the local GPU text"
  for i in 0 1; do
    say "$mode mode: server ${spans[$i]} computed $(batches "${metrics[$i]}")"
  done
  if [[ "$mode" == exact ]]; then
    # Decode speed through the swarm against local, on this GPU (reported, not checked).
    for where in local swarm; do
      if [[ "$where" == local ]]; then at=(--local); else at=(--no-mdns --bootstrap "$boot"); fi
      story "$dir/speed-$where.log" "${at[@]}" ||
        fail "generate --stats ($where): $(tail -n 5 "$dir/speed-$where.log")"
      speed[$where]="$(rates "$dir/speed-$where.log")"
    done
    say "decode through the swarm of two servers: ${speed[swarm]} tokens/s, local ${speed[local]} tokens/s ($(
      ratio "${speed[swarm]}" "${speed[local]}"))"
    # Several clients at once through the same two servers, which batch their steps:
    # the clients' decode rates added up, against the one client's.
    spids=()
    logs=()
    for c in $(seq "$speed_clients"); do
      logs+=("$dir/speed-swarm-$c.log")
      story "$dir/speed-swarm-$c.log" --no-mdns --bootstrap "$boot" &
      spids+=($!)
    done
    for c in $(seq "$speed_clients"); do
      wait "${spids[$((c - 1))]}" ||
        fail "generate --stats (client $c of $speed_clients): $(tail -n 5 "$dir/speed-swarm-$c.log")"
    done
    total="$(rates "${logs[@]}")"
    say "$speed_clients clients at once through the two servers: $total tokens/s added up ($(
      ratio "$total" "${speed[swarm]}") one client's)"
    for i in 0 1; do
      say "$mode mode: server ${spans[$i]} has now computed $(batches "${metrics[$i]}")"
    done
  fi
  # The next mode's servers take these blocks' place.
  # They are waited for: their metrics ports are the next ones'.
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
  pids=("${pids[0]}")
done
say "all GPU checks passed (logs in $dir)"
