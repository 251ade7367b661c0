#!/usr/bin/env bash
# GPU checks in one go (about 8 minutes on one recent GPU): certification throughput against the forward-pass
# limit and against the one-point-at-a-time loop, for LeNet and ResNet-110 in fp32 and bf16 (with per-point
# noise streams against one shared generator); `ssmooth-train trainer=gpu` for 2 epochs; `ssmooth-certify` on
# that checkpoint. Everything lands in $OUT (markdown tables, run folders, one log per step).
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine, from the repo root
#   DEVICE=cpu TRAINER=cpu QUICK=1 CERT_N=1000 bash benchmarks/gpu_check.sh   # the same steps on a CPU, tiny
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-/tmp/ssmooth_gpu_check}
DEVICE=${DEVICE:-cuda}
TRAINER=${TRAINER:-gpu}
N=${N:-10000}              # draws per point in the throughput runs
CERT_N=${CERT_N:-100000}   # n of the final ssmooth-certify run
QUICK=${QUICK:+--quick}    # QUICK=1: tiny throughput settings (checks that the steps run; numbers meaningless)
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
step() { echo "== $1 ($(date +%T))"; }

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi

step "LeNet: throughput (a/b/b1/c), forward options (bf16 on a GPU)"
$PY benchmarks/certify_throughput.py --model lenet --device "$DEVICE" --n "$N" --repeats 3 $QUICK \
    --skip memory selection | tee "$OUT/throughput_lenet.md"
step "ResNet-110 fp32: throughput"
$PY benchmarks/certify_throughput.py --model cifar_resnet110 --device "$DEVICE" --n "$N" --repeats 3 $QUICK \
    --autocast none --channels-last --skip forward memory selection | tee "$OUT/throughput_resnet110_fp32.md"
step "ResNet-110 bf16 (auto on a GPU): throughput and forward options"
$PY benchmarks/certify_throughput.py --model cifar_resnet110 --device "$DEVICE" --n "$N" --repeats 3 $QUICK \
    --channels-last --skip memory selection | tee "$OUT/throughput_resnet110_bf16.md"

step "Denoised smoothing: classifier o denoiser (DnCNN, one-shot diffusion UNet) against the classifier alone"
$PY benchmarks/denoiser_throughput.py --model cifar_resnet20 --device "$DEVICE" --diffusion | tee "$OUT/denoiser.md"

step "ssmooth-train trainer=$TRAINER, 2 epochs (pretrain, digits MLP: needs no dataset download)"
$PY -m ssmooth.cli.train '~experiment' trainer="$TRAINER" trainer.max_epochs=2 certify.n=2000 certify.max=50 \
    certify.progress=false hydra.run.dir="$OUT/train" 2>&1 | tail -20 | tee "$OUT/train.log"
step "ssmooth-certify on that checkpoint, n = $CERT_N"
$PY -m ssmooth.cli.certify ckpt="$OUT/train/checkpoints/last.ckpt" certify.n="$CERT_N" certify.max=100 \
    certify.progress=false device="$DEVICE" hydra.run.dir="$OUT/certify" 2>&1 | tail -20 | tee "$OUT/certify.log"
step "done: $OUT"
