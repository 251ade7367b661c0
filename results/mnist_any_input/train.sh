#!/usr/bin/env bash
# The MNIST any-input measurement, sigma $1 (0.25 | 0.5 | 1.0); SSMOOTH_DATA: a folder with mnist/*.npz.
# Cut for a 2-core CPU (see docs/RESULTS.md): 10 pretraining epochs, 3 sample-wise finetuning epochs, experts of
# 1 epoch each, selectors on 6,000 training images, 100 test points with adaptive sampling.
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
python $HERE/train_selectors.py $D $S radius selector_radius selector.target_images=6000 selector.target_samples=64
python $HERE/train_selectors.py $D $S table selector_table dataset.train_subset=6000 trainer.max_epochs=2
python $HERE/train_selectors.py $D $S radius selector_radius_se dataset.train_subset=6000 selector.target_samples=64 \
  selector.sigma_e=$S trainer.max_epochs=2
python $HERE/certify_all.py $D $S $HERE/s$S 100 10000
python $HERE/table.py $HERE/s$S
