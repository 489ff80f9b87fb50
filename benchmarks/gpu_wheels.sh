#!/usr/bin/env bash
# Fill the carry folder for benchmarks/gpu_proof.sh: the wheels the GPU image lacks, for ITS Python version, and
# the CIFAR-10 JPEG training split. Run here (with network), then name the folder in the device tool's `carry`.
#
#   bash benchmarks/gpu_wheels.sh PYTHON_VERSION [DEST]     e.g.  bash benchmarks/gpu_wheels.sh 3.12
#
# PYTHON_VERSION is the GPU image's (gpu_proof.sh's step env prints it; 3.12 as last seen). DEST defaults to
# gpu_carry/ (git-ignored). The image has torch, torchvision, matplotlib, pyyaml, rich, numpy and pillow, but not
# hydra-core, omegaconf, antlr4-python3-runtime (an sdist only: built here) or hatchling (so the project's own
# wheel is built here too). All are pure Python. Everything goes in with --no-deps there: the image's torch stays.
# The ImageNet resnet18 weights (45 MB) are copied only with GPU_WHEELS_WEIGHTS=1, as the carry limit is 64 MiB.
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
if [ -f "$tarball" ]; then install -m 0644 "$tarball" "$DEST/cifar10-jpeg-train.tar.gz"; else echo "warning: no $tarball" >&2; fi
if [ "${GPU_WHEELS_WEIGHTS:-0}" = 1 ]; then
  w="$("$PY" -c 'import torch; print(torch.hub.get_dir())')/checkpoints/resnet18-f37072fd.pth"
  if [ -f "$w" ]; then cp "$w" "$DEST/"; else echo "warning: no ImageNet weights at $w" >&2; fi
fi

ls -l "$DEST"
total=$(du -sb "$DEST" | cut -f1)
echo "total: $((total / 1024)) KiB in $DEST (the device tool carries at most 64 MiB with the checkout)"
(( total < 48 * 1024 * 1024 )) || { echo "error: $DEST is too large to carry" >&2; exit 1; }
