#!/usr/bin/env bash
# The WebGPU backend on a real GPU machine that has no network (the device tool's
# NVIDIA machines): checks the backend there (tests/webgpu_test.ts and the
# conformance suite), then runs `deno task bench --backend webgpu`.
#
#   backends/webgpu/gpu_bench.sh prepare   # here, once, with network: fills .gl/ and .gpubench/ (git-ignored)
#   backends/webgpu/gpu_bench.sh run       # there, from the repository root, carrying .gl and .gpubench
#
# `prepare` downloads the Vulkan loader (libvulkan1, as .deb), packs this machine's Deno binary,
# a DENO_DIR with the project's npm dependencies, and the shared models and references the
# bench and tests read from ../shared. Together about 40 MiB, under the 64 MiB a run carries.
# `run` unpacks the loader, points Vulkan at the NVIDIA driver, and writes its logs and the
# bench's JSON rows to $OUT (or /tmp/gpubench/out). With the device tool:
#   run(command="bash backends/webgpu/gpu_bench.sh run", carry=[".gl", ".gpubench"], timeout_s=540)
# Environment: BENCH_MODELS (default story,stories15m,stories110m), BENCH_DTYPES (default f32,q8_0,q4_0),
# BENCH_REPS (default 3), SKIP_TESTS=1 to go straight to the bench.
set -euo pipefail
cd "$(dirname "$0")/../.."

prepare() {
  local shared=../shared
  [ -d "$shared/models/story" ] || { echo "gpu_bench: cannot find $shared/models/story beside the repository" >&2; exit 1; }
  mkdir -p .git/info
  grep -qxF /.gpubench/ .git/info/exclude 2>/dev/null || echo /.gpubench/ >>.git/info/exclude
  grep -qxF /.gl/ .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
  rm -rf .gpubench
  mkdir -p .gpubench/shared/models .gpubench/shared/refs .gl /tmp/amd64/partial
  if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    local o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    apt-get "${o[@]}" update -qq
    (cd .gl && apt-get "${o[@]}" download libvulkan1)
  fi
  xz -T0 -6 -c "$(readlink -f "$(command -v deno)")" >.gpubench/deno.xz
  DENO_DIR="$PWD/.gpubench/deno_dir" deno cache examples/bench.ts tests/webgpu_test.ts tests/conformance_test.ts
  tar -C .gpubench -cJf .gpubench/deno_dir.tar.xz deno_dir
  rm -rf .gpubench/deno_dir
  cp -r "$shared/models/story" "$shared/models/minueza-32m-shape" .gpubench/shared/models/
  cp "$shared/refs/story-greedy.json" .gpubench/shared/refs/
  du -sh .gl .gpubench
}

run() {
  [ -f .gpubench/deno.xz ] || { echo "gpu_bench: run 'gpu_bench.sh prepare' first and carry .gl and .gpubench" >&2; exit 1; }
  local out="${OUT:-/tmp/gpubench/out}"
  mkdir -p "$out" /tmp/gpubench
  if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ -f "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
  xz -dc .gpubench/deno.xz >/tmp/gpubench/deno
  chmod +x /tmp/gpubench/deno
  tar -C /tmp/gpubench -xJf .gpubench/deno_dir.tar.xz
  export PATH="/tmp/gpubench:$PATH" DENO_DIR=/tmp/gpubench/deno_dir DENO_NO_UPDATE_CHECK=1
  export LLM_CACHE_DIR=/tmp/gpubench/cache
  # The bench and the tests read ../shared beside the repository.
  [ -e ../shared ] || ln -s "$PWD/.gpubench/shared" ../shared
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt" || true
  deno eval 'const a = await navigator.gpu.requestAdapter();
    console.log(JSON.stringify(a ? { info: a.info, features: [...a.features] } : "no adapter"));' | tee -a "$out/gpu.txt"
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    deno test --allow-all tests/webgpu_test.ts tests/conformance_test.ts 2>&1 | tee "$out/tests.log" ||
      echo "gpu_bench: the WebGPU tests failed (see tests.log)"
  fi
  deno task bench --backend webgpu --model "${BENCH_MODELS:-story,stories15m,stories110m}" \
    --dtype "${BENCH_DTYPES:-f32,q8_0,q4_0}" --reps "${BENCH_REPS:-3}" 2>&1 | tee "$out/bench.md"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
  echo "Usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
