#!/usr/bin/env bash
# The wheel folder for `benchmarks/gpu_proof.sh --wheels DIR`, an option for a GPU machine without a package
# index: the wheels its Python lacks, for ITS Python version, and the CIFAR-10 JPEG training split. Run it on a
# machine with network, then copy DIR to the GPU machine (or carry it with the checkout). docs/GPU.md.
#
#   bash benchmarks/gpu_wheels.sh PYTHON_VERSION [DEST]     e.g.  bash benchmarks/gpu_wheels.sh 3.12
#
# PYTHON_VERSION is the GPU machine's (gpu_proof.sh's step env prints it). DEST defaults to gpu_carry/
# (git-ignored). The GPU machine must already have torch (a CUDA build), torchvision, matplotlib, rich, numpy and
# pillow; these go in: hydra-core, omegaconf, antlr4-python3-runtime (an sdist only upstream: built here) and the
# project's own wheel (built here, so the GPU machine needs no hatchling). All are pure Python. gpu_proof.sh puts
# them in with --no-index --no-deps: the GPU machine's torch stays.
# The images: CIFAR_TARBALL (default ../shared/data/cifar10-jpeg/train.tar.gz), a .tar.gz holding train/, copied
# as DEST/cifar10-jpeg-train.tar.gz; without one, pass gpu_proof.sh --data PATH on the GPU machine.
# The ImageNet resnet18 weights (45 MB) are copied only with GPU_WHEELS_WEIGHTS=1. GPU_WHEELS_MAX_MIB (default 48,
# so that DEST fits a remote-run tool's 64 MiB carry limit with the checkout) refuses a larger DEST; 0: no limit
# (with the weights DEST is about 61 MiB: set it to 0 when DEST travels another way).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PYTHON_VERSION [DEST]   (e.g. 3.12)" >&2; exit 2; }
PYVER="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$(mkdir -p "${2:-$ROOT/gpu_carry}" && cd "${2:-$ROOT/gpu_carry}" && pwd)"
PY="${PY:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

rm -f "$DEST"/*.whl   # one version of each: two of a name stop the install there
# hydra-core 1.3 pins antlr4-python3-runtime==4.9.*; omegaconf 2.3 too
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" "$ROOT"   # the project (hatchling, here)

tarball="${CIFAR_TARBALL:-$ROOT/../shared/data/cifar10-jpeg/train.tar.gz}"
if [ -f "$tarball" ]; then
  install -m 0644 "$tarball" "$DEST/cifar10-jpeg-train.tar.gz"
else
  echo "warning: no $tarball (set CIFAR_TARBALL, or pass gpu_proof.sh --data PATH on the GPU machine)" >&2
fi
if [ "${GPU_WHEELS_WEIGHTS:-0}" = 1 ]; then
  w="$("$PY" -c 'import torch; print(torch.hub.get_dir())')/checkpoints/resnet18-f37072fd.pth"
  if [ -f "$w" ]; then cp "$w" "$DEST/"; else echo "warning: no ImageNet weights at $w" >&2; fi
fi

ls -l "$DEST"
total=$(du -sb "$DEST" | cut -f1)
max_mib="${GPU_WHEELS_MAX_MIB:-48}"
echo "total: $((total / 1024)) KiB in $DEST"
if (( max_mib > 0 && total >= max_mib * 1024 * 1024 )); then
  echo "error: $DEST is over GPU_WHEELS_MAX_MIB=$max_mib MiB (a 64 MiB carry limit with the checkout); 0: no limit" >&2
  exit 1
fi
