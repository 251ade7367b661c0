#!/usr/bin/env bash
# Train every model of the MNIST any-input measurement at sigma $1 (0.25 | 0.5 | 1.0); certify with certify_all.py.
# SSMOOTH_DATA: a folder with mnist/*.npz; RUNS: where the run folders go (default outputs/mnist_any_input).
# Cut for a 2-core CPU (see docs/RESULTS.md): 10 pretraining epochs, 3 sample-wise finetuning epochs, experts of
# 1 epoch each, selectors on 6,000 training images with radius targets from 64 draws per level.
set -euo pipefail
S=$1; D=${RUNS:-outputs/mnist_any_input}/s$S; HERE=$(dirname "$0")
COMMON="dataset.source=npz dataset.npz_dir=$SSMOOTH_DATA certify.enabled=false logger=csv"
ssmooth-train experiment=mnist_samplewise noise.sigma=$S trainer.max_epochs=10 'optim.scheduler.milestones=[5,8]' \
  pipeline.finetune_epochs=3 pipeline.finetune_lr=0.001 noise.fraction=0.8 selector.enabled=false \
  pipeline.constant_arm=false pipeline.experts=false $COMMON hydra.run.dir=$D
for F in 1.0 0.5 0.75 1.5 2.0; do
  L=$(python -c "print(format(round($S*$F,6),'g'))")
  ssmooth-train experiment=mnist_gaussian stage=finetune pretrained=$D/pretrain/checkpoints/last.ckpt noise.sigma=$L \
    trainer.max_epochs=1 optim.optimizer.lr=0.001 optim.scheduler=null $COMMON hydra.run.dir=$D/expert_s$L
done
# the radius-trained selector smoothed at the base level and at the largest level (the default); the table one;
# the largest-level one with class-balance weights (certified at sigma 1.0 only in docs/RESULTS.md)
python $HERE/train_selectors.py $D $S radius selector_radius_se dataset.train_subset=6000 selector.target_samples=64 \
  selector.sigma_e=$S trainer.max_epochs=2
python $HERE/train_selectors.py $D $S table selector_table dataset.train_subset=6000 trainer.max_epochs=2
python $HERE/train_selectors.py $D $S radius selector_radius dataset.train_subset=6000 selector.target_samples=64 \
  selector.sigma_e=$(python -c "print(format(round($S*2,6),'g'))") trainer.max_epochs=2
python $HERE/train_selectors.py $D $S radius selector_radius_balanced dataset.train_subset=6000 \
  selector.target_samples=64 selector.sigma_e=$(python -c "print(format(round($S*2,6),'g'))") selector.balance=true \
  trainer.max_epochs=2
