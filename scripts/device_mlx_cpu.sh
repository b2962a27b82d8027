#!/usr/bin/env bash
# MLX's CPU-only build for the GPU host (docs/benchmarks.md, session 17): its CUDA build runs the CPU
# backend in CUDA managed memory (4-6x dearer host reads and expert loads), the CPU-only build in plain
# host memory, the closer stand-in for a Mac's unified memory.
#
# Run from the project root:   bash scripts/device_mlx_cpu.sh
# It fills .device/cpu (~8 MB; ignored through .git/info/exclude): one call then carries it, e.g.
#   carry [".device/cpu"]  command: source .device/cpu/install.sh && OUT=$OUT STEPS=cpu16 bash scripts/device_wait_check.sh
# The tree plus the carry must stay under 64 MiB: move profiles/ aside for that call if it does not.
set -euo pipefail
V=${MLX_VERSION:-0.32.4}
LMV=${MLX_LM_VERSION:-0.32.2}
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .git/info
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$dl" "mlx==$V" "mlx-cpu==$V" "mlx-lm==$LMV"
rm -rf .device/cpu
mkdir -p .device/cpu "$dl/cpu"
(cd "$dl/cpu" && python3 -m zipfile -e "$dl"/mlx_cpu-*.whl . && tar cf - . | xz -6 -T0 > "$root/.device/cpu/mlx_cpu.tar.xz")
cp "$dl"/mlx-"$V"-cp312-*.whl "$dl"/mlx_lm-*.whl .device/cpu/
cat > .device/cpu/install.sh <<'INNER'
# Sourced on the device machine: MLX's CPU-only build in /root/site-cpu, first on PYTHONPATH.
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -d /root/site-cpu/mlx ]; then
  mkdir -p /root/site-cpu
  xz -d < "$_here/mlx_cpu.tar.xz" | tar x -C /root/site-cpu || return 1
  for w in "$_here"/*.whl; do python3 -m zipfile -e "$w" /root/site-cpu || return 1; done
fi
export PYTHONPATH=/root/site-cpu:$PWD
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
INNER
du -sh .device/cpu | sed 's/^/  /'
