#!/usr/bin/env bash
# shellcheck disable=SC2329  # the steps are called by name: "step_$2"
# The GPU proof: one command on a CUDA machine that measures cbam-train and writes everything into OUTDIR.
# The user's guide, with what each file means: docs/GPU.md.
#
#   bash benchmarks/gpu_proof.sh OUTDIR                          # every step, as the time limits allow
#   bash benchmarks/gpu_proof.sh --data ~/CIFAR-10-images OUTDIR # the images from a folder that holds train/
#   bash benchmarks/gpu_proof.sh --wheels gpu_carry OUTDIR       # no package index: install carried wheels first
#   bash benchmarks/gpu_proof.sh --smoke OUTDIR                  # the same steps at toy size on the CPU
#   GPU_PROOF_STEPS=env,install,data,fast bash benchmarks/gpu_proof.sh OUTDIR2   # a second call: what the first
#                                                                               # did not run
# OUTDIR is created if missing. One that already holds a proof's results (steps.tsv, gpu_proof.log or
# gpu_proof_runs.tar.gz) is refused with one line and exit status 2, never overwritten. Without OUTDIR the
# script writes into $OUT (how a remote-run tool that brings $OUT back calls it:
# bash benchmarks/gpu_proof.sh --wheels gpu_carry "$OUT"); with neither it prints its usage line and exits 2.
#
# Options (each has an environment variable too; the option wins):
#   --wheels DIR  GPU_PROOF_WHEELS  off by default. Step install puts DIR's wheels (benchmarks/gpu_wheels.sh makes
#                                   them: hydra-core, omegaconf, antlr4, cbam-train) into $PY with --no-index
#                                   --no-deps; step data then also takes DIR/cifar10-jpeg-train.tar.gz and
#                                   DIR/resnet18-f37072fd.pth. Without it, $PY is used as found: step install
#                                   only checks that it imports everything, or says what to pip install.
#   --data PATH   GPU_PROOF_DATA    the CIFAR-10 JPEG training images: a folder holding train/<class>/*.jpg
#                                   (linked, not copied) or a .tar.gz holding train/. Default: the wheel folder's
#                                   tarball, else data/cifar10-jpeg/ (`make data`), else ../shared/'s tarball.
#   --smoke       GPU_PROOF_SMOKE=1 toy sizes on the CPU: checks that every step runs (tests/test_gpu_proof.py)
# Other environment variables: GPU_PROOF_STEPS (below), GPU_PROOF_WORK (the work folder: the images, the run
# dirs; default ${TMPDIR:-/tmp}/gpu_proof-<uid>; a second call with the same one keeps the first's bench runs and
# picks), PY (the python, default python3), the time limits T_* (below), BENCH_RUNS, BENCH_SECONDS,
# PROFILE_STEPS, PROFILE_WARMUP, DEVICE, GPU_PROOF_PICK_64 and GPU_PROOF_PICK_512.
#
# Steps, cheap and most informative first (GPU_PROOF_STEPS picks them, in this order whatever the list's order):
#   env      nvidia-smi, python/torch/CUDA/cuDNN versions; fails (and stops the rest) if torch sees no GPU
#   install  with --wheels: the wheels with --no-index --no-deps (the environment's torch is never touched), then
#            the check; without: the check only (hydra-core, omegaconf, antlr4, cbam-train import; torch,
#            torchvision, numpy, pillow, matplotlib, rich are there); fails (and stops the rest) with one line
#   data     unpacks (or links) the CIFAR-10 JPEG training split; looks for the ImageNet weights
#   bench    task=bench over BENCH_RUNS (precision:batch:compile), then picks the fastest setting per batch size
#   profile  torch.profiler over 20 steps at batch 64 and 512 with the picked settings: top kernels by time
#   seed     experiment=seed (50 epochs, 3 stages, batch 64) on the real images, with the batch-64 pick
#   fast     experiment=fast (40 epochs, batch 512) on the real images, with the batch-512 pick
# A second call on a fresh machine has no picks.env: pass what the first printed, e.g.
#   GPU_PROOF_PICK_512='device.precision=bf16 device.compile=true device.compile_mode=default'
# Every step has its own time limit (T_* below, printed at the start), cut to what the whole-script deadline
# (T_TOTAL from the start) leaves; a step that fails or times out is recorded and the next one runs.
# OUTDIR gets: gpu_proof.log (everything printed), steps.tsv (step, exit status, seconds, note) and
# gpu_proof_runs.tar.gz (every run dir without checkpoints/model.pt: bench.json, summary.json, metrics.jsonl,
# curves.png, train.log, .hydra/; the per-step logs; the profiler tables).
# Exit status: 0 no step failed or timed out (one skipped for lack of time, '-' in steps.tsv, does not count);
# 1 a step failed or timed out; 2 nothing ran (the command line, or OUTDIR holds a previous proof's results).
set -u

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
STEP_NAMES="env install data bench profile seed fast"
RESULT_FILES="steps.tsv gpu_proof.log gpu_proof_runs.tar.gz"

usage() {
  echo "usage: bash benchmarks/gpu_proof.sh [--wheels DIR] [--data PATH] [--smoke] OUTDIR   (OUTDIR defaults to \$OUT; see docs/GPU.md)"
}

refuse() {  # one line on stderr, exit 2: nothing has run
  echo "gpu_proof: $*" >&2
  exit 2
}

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

parse_args() {  # the command line -> OUT, GPU_PROOF_WHEELS, GPU_PROOF_DATA, GPU_PROOF_SMOKE; checks them
  local outdir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --wheels | --data)
        [ $# -ge 2 ] && [ -n "$2" ] || refuse "$1 needs a path; $(usage)"
        if [ "$1" = --wheels ]; then GPU_PROOF_WHEELS="$2"; else GPU_PROOF_DATA="$2"; fi
        shift 2 ;;
      --wheels=*) GPU_PROOF_WHEELS="${1#*=}"; shift ;;
      --data=*) GPU_PROOF_DATA="${1#*=}"; shift ;;
      --smoke) GPU_PROOF_SMOKE=1; shift ;;
      -*) refuse "unknown option $1; $(usage)" ;;
      *) [ -z "$outdir" ] || refuse "one OUTDIR only (got $outdir and $1); $(usage)"
         outdir="$1"; shift ;;
    esac
  done
  [ -n "$outdir" ] || outdir="${OUT:-}"
  if [ -z "$outdir" ]; then usage >&2; exit 2; fi
  OUT="$(absolute "$outdir")"
  local f taken=()
  for f in $RESULT_FILES; do [ -e "$OUT/$f" ] && taken+=("$f"); done
  [ "${#taken[@]}" = 0 ] || refuse "$OUT already holds a proof's results (${taken[*]}): name a new OUTDIR, or move them away"
  if [ -n "$GPU_PROOF_WHEELS" ]; then
    [ -d "$GPU_PROOF_WHEELS" ] || refuse "--wheels $GPU_PROOF_WHEELS: no such folder (bash benchmarks/gpu_wheels.sh PYTHON_VERSION DIR makes one)"
    GPU_PROOF_WHEELS="$(absolute "$GPU_PROOF_WHEELS")"
  fi
  if [ -n "$GPU_PROOF_DATA" ]; then
    [ -e "$GPU_PROOF_DATA" ] || refuse "--data $GPU_PROOF_DATA: no such file or folder"
    GPU_PROOF_DATA="$(absolute "$GPU_PROOF_DATA")"
  fi
  local s
  for s in ${GPU_PROOF_STEPS//,/ }; do
    [[ " $STEP_NAMES " == *" $s "* ]] || refuse "GPU_PROOF_STEPS: no step '$s' (the steps: ${STEP_NAMES// /,})"
  done
}

export GPU_PROOF_SMOKE="${GPU_PROOF_SMOKE:-0}"
export GPU_PROOF_WHEELS="${GPU_PROOF_WHEELS:-}" GPU_PROOF_DATA="${GPU_PROOF_DATA:-}"
export GPU_PROOF_STEPS="${GPU_PROOF_STEPS:-env,install,data,bench,profile,seed,fast}"
# --step NAME is the driver calling itself for one step, with everything already in the environment
if [ "${1:-}" != --step ]; then
  parse_args "$@"
  GPU_PROOF_WORK="$(absolute "${GPU_PROOF_WORK:-${TMPDIR:-/tmp}/gpu_proof-$(id -u)}")"
  case "${PY:-}" in */*) PY="$(absolute "$PY")" ;; esac   # the steps run in the checkout, not here
fi
export OUT GPU_PROOF_WORK
export PY="${PY:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TERM=dumb

# Time limits in seconds. T_TOTAL keeps the whole script well inside one 600 s remote command, so the later
# steps may be cut short or skipped; the steps' limits and T_COLLECT add up to 1000 s (T_TOTAL=1000: each its own).
# Smoke mode checks that every step runs, not how fast: its limits only stop a hung step, and are ~10x what a
# step takes on a 2-core VM that is busy with other work (a step is 3-15 s there), so a slow machine never trips them.
if [ "$GPU_PROOF_SMOKE" = 1 ]; then
  : "${T_TOTAL:=1500}" "${T_ENV:=300}" "${T_INSTALL:=300}" "${T_DATA:=300}" "${T_BENCH:=600}" "${T_BENCH_RUN:=300}"
  : "${T_PROFILE:=300}" "${T_SEED:=300}" "${T_FAST:=300}" "${T_COLLECT:=120}"
else
  : "${T_TOTAL:=540}" "${T_ENV:=45}" "${T_INSTALL:=90}" "${T_DATA:=60}" "${T_BENCH:=220}" "${T_BENCH_RUN:=90}"
  : "${T_PROFILE:=75}" "${T_SEED:=240}" "${T_FAST:=240}" "${T_COLLECT:=30}"
fi
export T_TOTAL T_ENV T_INSTALL T_DATA T_BENCH T_BENCH_RUN T_PROFILE T_SEED T_FAST T_COLLECT

# What each step runs. On the GPU: the real images at full size. Smoke: tiny images, few of them, 1-epoch stages.
if [ "$GPU_PROOF_SMOKE" = 1 ]; then
  : "${DEVICE:=cpu}"
  : "${BENCH_RUNS:=fp32:16:off}"        # precision:batch:compile (off | default | reduce-overhead)
  : "${BENCH_SECONDS:=1}"
  SIZE_ARGS="model.width=8 model.pretrained=false data.image_size=8 data.limit=32 data.val_size=20 data.eval_batch_size=32 data.num_workers=0"
  SEED_SIZE="data.batch_size=16 train.checkpoint_every_n_epochs=0 schedule.stages.head.epochs=1 schedule.stages.high.epochs=1 schedule.stages.full.epochs=1"
  FAST_SIZE="data.batch_size=16 train.checkpoint_every_n_epochs=0 schedule.stages.all.epochs=1 schedule.stages.all.sched.warmup_epochs=0 augment.cutout.size=4"
  BENCH_EXTRA="stage=full bench.max_steps=2 bench.warmup_steps=1"
  PROFILE_BATCHES="16"
  : "${PROFILE_STEPS:=3}" "${PROFILE_WARMUP:=1}"
else
  : "${DEVICE:=cuda}"
  # eager first (cheap), then the compiled runs most likely to win: CUDA graphs at batch 64, where a step is
  # launch-bound; fp32 compiled last. Compiled runs time stage `full` only (one compile instead of three).
  : "${BENCH_RUNS:=bf16:512:off bf16:64:off bf16:64:reduce-overhead bf16:512:default fp32:512:off fp32:64:off bf16:512:reduce-overhead bf16:64:default fp32:64:reduce-overhead fp32:512:default fp32:64:default fp32:512:reduce-overhead}"
  : "${BENCH_SECONDS:=1.5}"
  SIZE_ARGS=""
  SEED_SIZE=""
  FAST_SIZE=""
  BENCH_EXTRA=""
  PROFILE_BATCHES="64 512"
  : "${PROFILE_STEPS:=20}" "${PROFILE_WARMUP:=5}"
fi
export PROFILE_STEPS PROFILE_WARMUP DEVICE BENCH_RUNS BENCH_SECONDS SIZE_ARGS SEED_SIZE FAST_SIZE BENCH_EXTRA PROFILE_BATCHES
export DATA_ROOT="$GPU_PROOF_WORK/data/cifar10-jpeg"
export RUNS="$GPU_PROOF_WORK/runs" LOGS="$GPU_PROOF_WORK/logs"
WEIGHTS_FILE=resnet18-f37072fd.pth   # torchvision's ResNet18_Weights.IMAGENET1K_V1

cli() { "$PY" -m cbam_train "$@"; }

left_s() { echo $(( GPU_PROOF_DEADLINE - $(date +%s) )); }

record() {  # step, exit status, seconds, note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/steps.tsv"
  echo "--- $1: exit $2 after $3 s${4:+ ($4)}"
}

status_note() {
  case "$1" in
    0) echo ok ;; 124) echo "timed out after $2 s" ;; 137) echo "killed after $2 s" ;; *) echo failed ;;
  esac
}

# ---------------------------------------------------------------------------------------------- the steps

step_env() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  echo "uname: $(uname -a)"; echo "nproc: $(nproc)"; free -g 2>/dev/null | head -2
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|triton|hydra-core|omegaconf|antlr4-python3-runtime|matplotlib|numpy|pillow|pyyaml|rich|cbam-train) '
  "$PY" - <<'EOF'
import os, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
except Exception as e:
    sys.exit(f"gpu_proof: {sys.executable} cannot import torch ({type(e).__name__}: {str(e).splitlines()[0]}): "
             "pip install torch, a CUDA build (https://pytorch.org/get-started/locally/)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
elif os.environ.get("GPU_PROOF_SMOKE") == "1":
    print("torch sees no GPU (smoke mode: the steps run on the CPU)")
elif torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build: pip install a CUDA build "
             "(https://pytorch.org/get-started/locally/); the remaining steps would measure the CPU")
else:
    sys.exit("torch sees no GPU: the remaining steps would measure the CPU")
EOF
}

step_install() {
  if [ -z "$GPU_PROOF_WHEELS" ]; then
    echo "no --wheels: $PY as found, nothing installed"
    check_python ""
    return
  fi
  shopt -s nullglob
  local wheels=("$GPU_PROOF_WHEELS"/*.whl)
  if [ "${#wheels[@]}" = 0 ]; then
    if [ "$GPU_PROOF_SMOKE" = 1 ]; then
      echo "no wheels in $GPU_PROOF_WHEELS: nothing to install (smoke)"; check_python ""; return
    fi
    echo "gpu_proof: no wheels in $GPU_PROOF_WHEELS: bash benchmarks/gpu_wheels.sh PYTHON_VERSION $GPU_PROOF_WHEELS makes them"
    return 1
  fi
  printf '  %s\n' "${wheels[@]##*/}"
  local torch_before; torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
  # --no-deps: only the carried wheels go in; the environment's torch, torchvision, matplotlib... stay as they are
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --find-links "$GPU_PROOF_WHEELS" \
    "${wheels[@]}" || return 1
  check_python "$torch_before" || return 1
  "$PY" -m pip check || echo "(pip check complained: see above; the imports worked)"
}

# Does $PY import what the steps need? Run from / so that cbam_train is the installed one (the one
# benchmarks/gpu_profile.py imports), not this checkout's by way of the current folder. hydra, omegaconf, antlr4
# and cbam_train's command line are imported (0.2 s: it imports torch lazily); torch and the rest are only found,
# as step env has imported torch, unless $1 (torch's version before an install) asks for the full check.
# What is missing: one line naming what to pip install.
check_python() {
  (cd / && "$PY" - "$ROOT" "$1" "$GPU_PROOF_WHEELS" <<'EOF'
import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

root, torch_before, wheels = sys.argv[1:4]
imported = [("hydra", "hydra-core"), ("omegaconf", "omegaconf"), ("antlr4", "antlr4-python3-runtime"),
            ("cbam_train.cli.command", "cbam-train")]
found = [("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"), ("PIL", "pillow"),
         ("matplotlib", "matplotlib"), ("rich", "rich")]
ours = {m.split(".")[0] for m, _ in imported + found}
missing, broken = [], []
for mod, dist in imported + found:
    try:
        if (mod, dist) in imported or torch_before:
            importlib.import_module(mod)
        elif importlib.util.find_spec(mod) is None:
            raise ModuleNotFoundError(f"No module named {mod!r}", name=mod)
    except ModuleNotFoundError as e:
        top = (e.name or mod).split(".")[0]
        if top == mod.split(".")[0]:
            missing.append(dist)
        elif top not in ours:
            missing.append(f"{top} (for {dist})")
    except Exception as e:
        broken.append(f"{dist} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
if missing or broken:
    specs = {"hydra-core": "'hydra-core>=1.3,<1.4'", "omegaconf": "'omegaconf>=2.3,<2.4'",
             "antlr4-python3-runtime": "'antlr4-python3-runtime==4.9.*'"}
    if "cbam-train" in missing or broken:
        fix = f"pip install -e {root} (cbam-train with its dependencies)"
    else:
        fix = "pip install " + " ".join(specs.get(d, d.split(" ")[0]) for d in missing)
    if "torch" in missing:
        fix += "; torch: a CUDA build (https://pytorch.org/get-started/locally/)"
    if not wheels:
        fix += "; or, without a package index, --wheels DIR (benchmarks/gpu_wheels.sh fills DIR)"
    sys.exit(f"gpu_proof: {sys.executable} cannot import {', '.join(missing + broken)}: {fix}")


def v(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


import cbam_train  # noqa: E402

where = Path(cbam_train.__file__).resolve().parent
print("found:", ", ".join(f"{d} {v(d)}" for d in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "cbam-train",
                                                  "torch", "torchvision", "matplotlib")))
print(f"cbam_train imported from {where}; the cli steps run {root}'s copy (python -m cbam_train from there)")
if torch_before:
    import torch
    if torch.__version__ != torch_before:
        sys.exit(f"torch changed: {torch_before} -> {torch.__version__}")
EOF
  )
}

step_data() {
  local src=""   # where the images come from: --data, the wheel folder's tarball, `make data`'s folder, ../shared/
  if [ -n "$GPU_PROOF_DATA" ]; then
    src="$GPU_PROOF_DATA"
  elif [ -n "$GPU_PROOF_WHEELS" ] && [ -f "$GPU_PROOF_WHEELS/cifar10-jpeg-train.tar.gz" ]; then
    src="$GPU_PROOF_WHEELS/cifar10-jpeg-train.tar.gz"
  elif [ -d "$ROOT/data/cifar10-jpeg/train" ]; then
    src="$ROOT/data/cifar10-jpeg"
  elif [ -f "$ROOT/../shared/data/cifar10-jpeg/train.tar.gz" ]; then
    src="$ROOT/../shared/data/cifar10-jpeg/train.tar.gz"   # a checkout beside shared/
  fi
  [ -L "$DATA_ROOT/train" ] && [ -n "$src" ] && rm "$DATA_ROOT/train"   # a link from an earlier call: renewed
  if [ -d "$DATA_ROOT/train" ]; then
    echo "already unpacked: $DATA_ROOT"
  elif [ -z "$src" ]; then
    echo "gpu_proof: no CIFAR-10 JPEG images: pass --data PATH (a folder holding train/<class>/*.jpg, or a .tar.gz of one; docs/GPU.md)"
    return 1
  elif [ -d "$src" ]; then
    [ -d "$src/train" ] || { echo "gpu_proof: --data $src holds no train/ folder"; return 1; }
    # a link: the images stay where they are; the decoded cache (.cbam-cache/) goes beside the link
    mkdir -p "$DATA_ROOT" && ln -s "$src/train" "$DATA_ROOT/train" || return 1
    echo "linked: $DATA_ROOT/train -> $src/train"
  else
    mkdir -p "$DATA_ROOT" && tar -xzf "$src" -C "$DATA_ROOT" || return 1
    [ -d "$DATA_ROOT/train" ] || { echo "gpu_proof: $src holds no train/ folder"; return 1; }
    echo "unpacked: $src"
  fi
  echo "images: $(find -L "$DATA_ROOT/train" -type f | wc -l) in $(find -L "$DATA_ROOT/train" -mindepth 1 -maxdepth 1 -type d | wc -l) classes"
  local hub; hub="$("$PY" -c 'import torch; print(torch.hub.get_dir())')/checkpoints"
  if [ ! -f "$hub/$WEIGHTS_FILE" ] && [ -n "$GPU_PROOF_WHEELS" ] && [ -f "$GPU_PROOF_WHEELS/$WEIGHTS_FILE" ]; then
    mkdir -p "$hub" && cp "$GPU_PROOF_WHEELS/$WEIGHTS_FILE" "$hub/"
  fi
  if [ "$GPU_PROOF_SMOKE" != 1 ] && [ -f "$hub/$WEIGHTS_FILE" ]; then
    echo "ImageNet weights: $hub/$WEIGHTS_FILE: the seed recipe runs pretrained"; echo true >"$GPU_PROOF_WORK/pretrained"
  else
    echo "ImageNet weights: not at $hub/$WEIGHTS_FILE (or smoke mode): the seed recipe runs with model.pretrained=false (from random weights: its accuracy is not the recipe's)"
    echo false >"$GPU_PROOF_WORK/pretrained"
  fi
}

bench_args() {  # precision:batch:compile -> overrides
  local p b c; IFS=: read -r p b c <<<"$1"
  echo "device.precision=$p data.batch_size=$b"
  case "$c" in
    off) ;;
    *) echo "device.compile=true device.compile_mode=$c" ;;
  esac
}

step_bench() {
  local failed=0 bench_end=$(( $(date +%s) + T_BENCH ))
  for spec in $BENCH_RUNS; do
    local name="bench-${spec//:/-}" left=$(( bench_end - $(date +%s) ))
    if [ -f "$RUNS/$name/bench.json" ]; then echo "$name: done earlier"; continue; fi
    if (( left < 15 )); then record "bench/$spec" - 0 "skipped: bench budget spent"; continue; fi
    local t=$(( T_BENCH_RUN < left ? T_BENCH_RUN : left )) stage=""
    [ "${spec##*:}" = off ] || stage="stage=full"
    echo "=== $name (limit $t s)"
    local t0=$SECONDS
    # shellcheck disable=SC2046,SC2086  # the overrides are words
    timeout -k 5 "$t" "$PY" -m cbam_train task=bench data=imagefolder data.root="$DATA_ROOT" device="$DEVICE" \
      $(bench_args "$spec") $stage bench.seconds="$BENCH_SECONDS" $BENCH_EXTRA $SIZE_ARGS log.mode=plain \
      hydra.run.dir="$RUNS/$name"
    local rc=$?
    record "bench/$spec" "$rc" $(( SECONDS - t0 )) "$(status_note "$rc" "$t")"
    [ "$rc" = 0 ] || failed=1
  done
  pick_fastest
  return "$failed"
}

pick_fastest() {  # the bench.json files -> a table, and $GPU_PROOF_WORK/picks.env: the fastest overrides per batch
  "$PY" - "$RUNS" "$GPU_PROOF_WORK/picks.env" <<'EOF'
import json, sys
from pathlib import Path
runs, picks_file = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for f in sorted(runs.glob("bench-*/bench.json")):
    r = json.loads(f.read_text())
    p, b, c = f.parent.name.split("-", 1)[1].split("-", 2)
    rows.append((p, int(b), c, r))
fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"
print(f"{'precision':>9} {'batch':>5} {'compile':>15} {'e2e':>9} {'train full':>10} {'bare full':>9} "
      f"{'loader':>9} {'augment':>9} {'eval':>9} {'overhead%':>9} {'peak MB':>8}")
for p, b, c, r in rows:
    full = list(r["train_images_per_s"])[-1]
    print(f"{p:>9} {b:>5} {c:>15} {fmt(r['train_end_to_end_images_per_s']):>9} {fmt(r['train_images_per_s'][full]):>10} "
          f"{fmt(r['bare_step_images_per_s'][full]):>9} {fmt(r['loader_images_per_s']):>9} "
          f"{fmt(r['augment_images_per_s']):>9} {fmt(r['eval_images_per_s']):>9} {r['loop_overhead_pct']:>9.1f} "
          f"{r['peak_memory_mb']:>8.0f}")
lines = []
for b in sorted({b for _, b, _, _ in rows}):
    p, _, c, r = max((row for row in rows if row[1] == b), key=lambda row: row[3]["train_end_to_end_images_per_s"])
    args = f"device.precision={p}" + ("" if c == "off" else f" device.compile=true device.compile_mode={c}")
    lines.append(f"PICK_{b}='{args}'")
    e2e, full = r["train_end_to_end_images_per_s"], list(r["train_images_per_s"])[-1]
    slowest = min((("input pipeline", r["loader_images_per_s"]), ("augmentation", r["augment_images_per_s"] or float("inf")),
                   ("training step", r["train_images_per_s"][full])), key=lambda kv: kv[1])
    print(f"batch {b}: fastest {args} ({e2e:,.0f} images/s end to end); slowest part: {slowest[0]} "
          f"({slowest[1]:,.0f} images/s); loop overhead {r['loop_overhead_pct']:.1f}% over the bare step")
picks_file.write_text("\n".join(lines) + "\n")
EOF
}

pick_for() {  # batch size -> GPU_PROOF_PICK_<batch> if set, else the bench step's pick, else bf16 eager
  local forced="GPU_PROOF_PICK_$1"
  if [ -n "${!forced:-}" ]; then echo "${!forced}"; return; fi
  # shellcheck disable=SC2034  # picks.env sets them
  local PICK_64="" PICK_512="" PICK_16=""
  # shellcheck disable=SC1091
  [ -f "$GPU_PROOF_WORK/picks.env" ] && . "$GPU_PROOF_WORK/picks.env"
  local var="PICK_$1" default="device.precision=bf16"
  [ "$GPU_PROOF_SMOKE" = 1 ] && default="device.precision=fp32"
  echo "${!var:-$default}"
}

step_profile() {
  local failed=0
  for b in $PROFILE_BATCHES; do
    local pick; pick="$(pick_for "$b")"
    echo "=== profile at batch $b: $pick"
    # shellcheck disable=SC2086
    "$PY" "$ROOT/benchmarks/gpu_profile.py" "$RUNS/profile-b$b" data=synthetic device="$DEVICE" \
      data.batch_size="$b" $pick $SIZE_ARGS || failed=1
  done
  return "$failed"
}

step_seed() {
  local pretrained=false pick; pick="$(pick_for 64)"
  [ -f "$GPU_PROOF_WORK/pretrained" ] && pretrained="$(cat "$GPU_PROOF_WORK/pretrained")"
  echo "experiment=seed with $pick model.pretrained=$pretrained"
  # shellcheck disable=SC2086
  cli experiment=seed data=imagefolder data.root="$DATA_ROOT" device="$DEVICE" $pick model.pretrained="$pretrained" \
    $SIZE_ARGS $SEED_SIZE log.mode=plain hydra.run.dir="$RUNS/seed"
}

step_fast() {
  local pick; pick="$(pick_for 512)"
  [ "$GPU_PROOF_SMOKE" = 1 ] && pick="$(pick_for 16)"
  echo "experiment=fast with $pick"
  # shellcheck disable=SC2086
  cli experiment=fast data=imagefolder data.root="$DATA_ROOT" device="$DEVICE" $pick $SIZE_ARGS $FAST_SIZE \
    log.mode=plain hydra.run.dir="$RUNS/fast"
}

# ------------------------------------------------------------------------------------------- the driver

if [ "${1:-}" = --step ]; then   # one step, in its own process so that `timeout` can stop all of it
  cd "$ROOT" || exit 1
  "step_$2"
  exit $?
fi

budget_of() { local v="T_${1^^}"; echo "${!v}"; }

main() {
  cd "$ROOT" || exit 1
  export GPU_PROOF_DEADLINE=$(( $(date +%s) + T_TOTAL ))
  echo "gpu_proof: $(date -u +%FT%TZ), smoke=$GPU_PROOF_SMOKE, steps=$GPU_PROOF_STEPS, device=$DEVICE"
  echo "OUT=$OUT WORK=$GPU_PROOF_WORK PY=$PY WHEELS=${GPU_PROOF_WHEELS:-(none: $PY as found)} DATA=${GPU_PROOF_DATA:-(default)}"
  if [ -d "$RUNS" ]; then
    echo "note: $RUNS holds an earlier call's runs: finished bench runs and picks.env are kept and go into this" \
         "tarball too, and seed and fast refuse a run dir already used; for a fresh measurement remove" \
         "$GPU_PROOF_WORK or set GPU_PROOF_WORK to a new folder"
  fi
  echo "time limits (s): total $T_TOTAL; env $T_ENV, install $T_INSTALL, data $T_DATA, bench $T_BENCH" \
       "(each run $T_BENCH_RUN), profile $T_PROFILE, seed $T_SEED, fast $T_FAST, collect $T_COLLECT"
  echo "bench runs (precision:batch:compile): $BENCH_RUNS; bench.seconds=$BENCH_SECONDS"
  local stop=""
  for name in env install data bench profile seed fast; do
    [[ ",$GPU_PROOF_STEPS," == *",$name,"* ]] || continue
    if [ -n "$stop" ]; then record "$name" - 0 "skipped: $stop"; continue; fi
    local budget left t t0 rc
    budget="$(budget_of "$name")"; left=$(( $(left_s) - T_COLLECT ))
    if (( left < 10 )); then record "$name" - 0 "skipped: no time left (T_TOTAL $T_TOTAL s)"; continue; fi
    t=$(( budget < left ? budget : left ))
    echo; echo "=== step $name (limit $t s of its $budget s; $left s left before collect) $(date -u +%T)"
    t0=$SECONDS
    mkdir -p "$LOGS"
    timeout -k 10 "$t" bash "$SELF" --step "$name" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $(( SECONDS - t0 )) "$(status_note "$rc" "$t")"
    if [ "$name" = env ] && [ "$rc" != 0 ]; then stop="step env failed (no GPU?)"; fi
    if [ "$name" = install ] && [ "$rc" != 0 ]; then stop="step install failed"; fi
  done

  echo; echo "=== collect $(date -u +%T)"
  local tarball="$OUT/gpu_proof_runs.tar.gz"
  local found=() f
  for f in runs logs picks.env pretrained; do [ -e "$GPU_PROOF_WORK/$f" ] && found+=("$f"); done
  ( cd "$GPU_PROOF_WORK" && timeout "$T_COLLECT" tar -czf "$tarball" --exclude=checkpoints --exclude=model.pt \
      --exclude=.cbam-cache "${found[@]}" ) || echo "collect: tar failed (exit $?)"
  ls -l "$tarball" 2>/dev/null
  if [ -f "$tarball" ] && (( $(stat -c %s "$tarball") > 16 * 1024 * 1024 )); then
    echo "warning: $tarball is over 16 MiB and will not come back from the device machine"
  fi

  echo; echo "=== summary (step, exit status, seconds, note; '-' = not run)"
  column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
  [ -f "$GPU_PROOF_WORK/picks.env" ] && { echo "picked:"; cat "$GPU_PROOF_WORK/picks.env"; }
  for f in "$RUNS"/seed/summary.json "$RUNS"/fast/summary.json; do
    [ -f "$f" ] && "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-2], \
'best_val_acc', s.get('best_val_acc'), 'final_val_acc', s.get('final_val_acc'), 'epochs', s.get('epochs_run'), \
'wall_time_s', s.get('wall_time_s'))" "$f"
  done
  awk -F'\t' '$2 != "0" && $2 != "-" { bad = 1 } END { exit bad }' "$OUT/steps.tsv"
}

mkdir -p "$OUT" "$GPU_PROOF_WORK" || refuse "cannot create $OUT or $GPU_PROOF_WORK"
: >"$OUT/steps.tsv"
main 2>&1 | tee "$OUT/gpu_proof.log"
exit "${PIPESTATUS[0]}"
