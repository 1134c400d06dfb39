#!/usr/bin/env bash
# Builds `pollen` with `--features cuda` using only the CUDA toolkit's PyPI wheels:
# no system CUDA install and no GPU are needed to build.
#
#   bash scripts/build-cuda.sh            # -> $CARGO_TARGET_DIR/release/pollen
#   bash scripts/build-cuda.sh --bench    # and the engine bench -> .../release/engine-bench
#
# On a machine with a GPU, `bash scripts/gpu-check.sh` then runs the engine bench
# on the GPU and checks that generation there (local and through a swarm) works.
#
# The `nvidia-cuda-nvcc-cu12` wheels (every release, 12.0 to 12.9) ship only
# ptxas and libnvvm, not the nvcc driver, cicc or cudafe++, so they cannot build
# candle's kernels. The CUDA 13 wheels do ship the whole compiler, so this
# script installs the `cuda-toolkit` meta-package at one pinned release into a
# venv under $POLLEN_CACHE_DIR (default ~/.cache/pollen).
#
# Environment:
#   CUDA_COMPUTE_CAP   GPU architecture for the kernels, e.g. 80 (A100), 86, 89,
#                      90 (H100). Default: the first GPU's, from nvidia-smi, else 80.
#   CARGO_TARGET_DIR   default target/cuda, apart from the CPU build (the two
#                      builds use different RUSTFLAGS and would rebuild each other).
#   CUDAFORGE_THREADS  parallel nvcc jobs (default: all cores).
#
# candle links the CUDA libraries at link time (cudarc's `dynamic-linking`), so
# the binary needs the NVIDIA driver's libcuda.so.1 to start. The toolkit
# libraries (cuBLAS, cuRAND, NVRTC, cudart) are found through an rpath into the
# venv. The wheels carry no driver, so libcuda is linked against a stub made
# here from the symbol list of cudarc's bindings; every stub function returns
# CUDA_ERROR_STUB_LIBRARY, and the stub is never on the binary's search path.
set -euo pipefail

bench=0
case "${1:-}" in
  --bench) bench=1 ;;
  "") ;;
  *) echo "usage: bash scripts/build-cuda.sh [--bench]" >&2; exit 2 ;;
esac

CUDA_TOOLKIT_VERSION=13.0.2
# The oldest CUDA 13 release, on purpose: candle loads its kernels as PTX, which the
# driver compiles at start, and a driver refuses PTX from a newer nvcc than its own
# CUDA version. Built with 13.0, the binary runs on every CUDA 13 driver (r580 on).
# The exact wheels cuda-toolkit==13.0.2 resolves to, pinned so that a later upload
# cannot change the build.
PACKAGES=(
  "cuda-toolkit[nvcc,cccl,cudart,cublas,curand]==${CUDA_TOOLKIT_VERSION}"
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${POLLEN_CACHE_DIR:-$HOME/.cache/pollen}"
venv="$cache/cuda-toolkit-$CUDA_TOOLKIT_VERSION"
stamp="$venv/.pollen-installed"

log() { printf 'build-cuda: %s\n' "$*" >&2; }

if [[ ! -f "$stamp" ]]; then
  log "installing the CUDA $CUDA_TOOLKIT_VERSION toolkit wheels into $venv (about 1.2 GB)"
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  touch "$stamp"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cuda_home="$site/nvidia/cu13"
if [[ ! -x "$cuda_home/bin/nvcc" ]]; then
  log "no nvcc at $cuda_home/bin/nvcc; remove $venv and run again"
  exit 1
fi

# The wheels carry only versioned sonames; the linker's -lNAME wants libNAME.so.
for lib in cublas cublasLt curand nvrtc cudart; do
  target="$(cd "$cuda_home/lib" && ls "lib$lib.so."* 2>/dev/null | sort | head -n1 || true)"
  if [[ -z "$target" ]]; then
    log "lib$lib.so.* missing from $cuda_home/lib"
    exit 1
  fi
  ln -sfn "$target" "$cuda_home/lib/lib$lib.so"
done

# Link-time stub for the driver library, from the functions cudarc declares.
stubs="$cuda_home/lib/stubs"
if [[ ! -f "$stubs/libcuda.so" ]]; then
  cudarc="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' 2>/dev/null | sort -V | tail -n1)"
  if [[ -z "$cudarc" ]]; then
    (cd "$repo" && cargo fetch --quiet)
    cudarc="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -n1)"
  fi
  mkdir -p "$stubs"
  {
    echo '/* Link-time stand-in for libcuda.so.1: every entry point fails. */'
    grep -ohE 'fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" | sort -u |
      sed -E 's/^fn (cu[A-Za-z0-9_]+)\($/int \1(void) { return 34; \/* CUDA_ERROR_STUB_LIBRARY *\/ }/'
  } >"$stubs/cuda_stub.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/cuda_stub.c"
  ln -sfn libcuda.so "$stubs/libcuda.so.1"
fi

if [[ -z "${CUDA_COMPUTE_CAP:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 &&
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')" &&
    [[ -n "$cap" ]]; then
    CUDA_COMPUTE_CAP="$cap"
  else
    CUDA_COMPUTE_CAP=80
    log "no GPU to query: building kernels for compute capability 8.0 (set CUDA_COMPUTE_CAP to change)"
  fi
fi

export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
export NVCC="$cuda_home/bin/nvcc"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$cuda_home/lib"

log "nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR"
cd "$repo"
cargo build --release --locked --features cuda -p pollen-node --bin pollen

bin="$CARGO_TARGET_DIR/release/pollen"
# Smoke check: the binary starts. Without a driver, borrow the stub for this one run.
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  "$bin" --version
else
  log "no NVIDIA driver here (libcuda.so.1): checking that the binary starts against the stub"
  LD_LIBRARY_PATH="$stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" --version
fi
log "built $bin"

if [[ "$bench" == 1 ]]; then
  exe="$(cargo bench --locked --features cuda -p pollen-shard --bench engine --no-run \
    --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
  if [[ -z "$exe" ]]; then
    log "the engine bench did not build; run: cargo bench --features cuda -p pollen-shard --bench engine --no-run"
    exit 1
  fi
  cp "$exe" "$CARGO_TARGET_DIR/release/engine-bench"
  log "built $CARGO_TARGET_DIR/release/engine-bench (run it with: --device cuda)"
fi
