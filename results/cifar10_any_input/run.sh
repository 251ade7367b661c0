#!/usr/bin/env bash
# The CIFAR-10 any-input measurement in one pipeline command: ResNet-20 at sigma 0.25 on the 4,000 training images
# of a local npz copy, its experts and radius-trained selector, every certificate on the same test points.
# SSMOOTH_DATA: a folder with cifar10/*.npz; RUNS: where the run folder goes; extra arguments are overrides.
# Cut for a 2-core CPU (see docs/RESULTS.md): 15 pretraining epochs, 2 finetuning epochs (the sample-wise model and
# each expert), radius targets from 16 draws per level, 50 test points (every 20th of the 1,000) at n = 2,000.
# The selector is smoothed at the base level, as when the recorded results ran (the default is now the largest).
set -euo pipefail
D=${RUNS:-outputs/cifar10_any_input}/s0.25
ssmooth-train experiment=cifar10_samplewise model.depth=20 noise.sigma=0.25 dataset.source=npz \
  dataset.npz_dir=$SSMOOTH_DATA dataset.num_workers=0 dataset.batch_size=128 trainer.max_epochs=15 \
  'optim.scheduler.milestones=[8,12]' pipeline.finetune_epochs=2 pipeline.constant_arm=false noise.fraction=0.8 \
  selector.target_samples=16 selector.epochs=5 selector.sigma_e=0.25 certify.skip=20 certify.n0=64 certify.n=2000 certify.sampling=adaptive \
  'certify.kinds=[constant,samplewise,inductive,inductive_set]' certify.batch_size=500 logger=csv \
  hydra.run.dir=$D "$@"
