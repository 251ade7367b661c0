#!/usr/bin/env bash
# Reproduce the published protocol on MNIST or CIFAR-10 (docs/METHOD.md) and write one report.
#
#   bash scripts/reproduce.sh mnist|cifar10        (make reproduce-mnist / make reproduce-cifar10)
#
# For each sigma in SIGMAS, one pipeline job: pretrain with the published Gaussian recipe (Cohen et al.: that
# job's "pretrain" certificate IS the Gaussian baseline), then finetune with per-sample levels and, beside it,
# at the constant level for the same epochs. Certification: every SKIP-th test image, n = 100000,
# alpha = 0.001. Jobs run one after another (Hydra multirun); re-running skips finished stages and resumes a
# killed certification. SMOKE=1 runs the same pipeline at toy size on a CPU in minutes.
#
# Environment: SHARED (a folder with mnist/*.npz, cifar10/*.npz: used when present, else torchvision downloads
# into data/), SIGMAS (default 0.25,0.5,1.0), SKIP (default 20), OUT (default outputs/reproduce/DATASET),
# EXTRA (more overrides, e.g. "trainer=gpu" or "trainer=ddp trainer.devices=4").
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=${1:?usage: reproduce.sh mnist|cifar10}
case "$dataset" in mnist|cifar10) ;; *) echo "unknown dataset $dataset (mnist|cifar10)" >&2; exit 2 ;; esac

SMOKE=${SMOKE:-0}
SIGMAS=${SIGMAS:-0.25,0.5,1.0}
SKIP=${SKIP:-20}
OUT=${OUT:-outputs/reproduce/$dataset$([ "$SMOKE" = 1 ] && echo _smoke)}
SHARED=${SHARED:-}
EXTRA=${EXTRA:-}
BIN=${BIN:-.venv/bin}

if [ -n "$SHARED" ] && { [ -f "$SHARED/$dataset/${dataset}_test.npz" ] || { [ "$dataset" = cifar10 ] && [ -f "$SHARED/cifar10/cifar10_test_first1000.npz" ]; }; }; then
  data="dataset.source=npz dataset.npz_dir=$SHARED"
else
  data="dataset.source=torchvision dataset.download=true"
fi

protocol="certify.skip=$SKIP certify.n=100000 certify.n0=100 certify.alpha=0.001"
if [ "$SMOKE" = 1 ]; then
  # Toy size, same code path: one short epoch per stage, a few points, few samples.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  depth=$([ "$dataset" = cifar10 ] && echo "model.depth=20" || true)
  protocol="certify.skip=100 certify.max=300 certify.n=1000 certify.n0=32 certify.alpha=0.001 certify.batch_size=1000
    trainer.max_epochs=1 pipeline.finetune_epochs=1 dataset.train_subset=256 dataset.batch_size=64
    dataset.num_workers=0 noise.num_draws=4 noise.update_every=1 trainer.accelerator=cpu $depth"
fi

# shellcheck disable=SC2086
$BIN/ssmooth-train -m experiment=${dataset}_samplewise "noise.sigma=$SIGMAS" $data $protocol \
  trainer.enable_progress_bar=false certify.progress=false hydra.sweep.dir="$OUT" \
  'hydra.sweep.subdir=sigma${noise.sigma}' $EXTRA
$BIN/ssmooth-report "$OUT"
echo "report: $OUT/report.md"
