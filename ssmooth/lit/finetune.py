"""Stages B-C of the method: finetune with a noise level per training sample (SPEC section 3)."""
from __future__ import annotations

import copy

import torch
from typing_extensions import override

from ssmooth.lit.module import SmoothingModule
from ssmooth.noise import SampleWiseSigma


class SigmaFinetuneModule(SmoothingModule):
    """Finetunes with ``noise`` = a SampleWiseSigma table, re-selected from the model every ``update_every`` epochs.

    Selection (SPEC section 3 B) uses the labels of the training samples and ``num_draws`` noise draws per grid
    level, on the un-augmented training images. Under DDP each rank selects for its own share of the samples
    and the shares are gathered, so every rank holds the whole table (it is a buffer: checkpointed with the
    weights, restored on resume).
    """

    def __init__(self, *args, update_every: int = 2, num_draws: int = 32, soft: bool = False,
                 selection_batch_size: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.noise, SampleWiseSigma):
            raise TypeError(f"SigmaFinetuneModule needs a SampleWiseSigma policy, got {type(self.noise).__name__}")
        if update_every < 1 or num_draws < 1:
            raise ValueError(f"update_every and num_draws must be >= 1, got {update_every}, {num_draws}")
        self.update_every, self.num_draws, self.soft = update_every, num_draws, soft
        self.selection_batch_size = selection_batch_size

    @override
    def on_train_epoch_start(self) -> None:
        if self.current_epoch % self.update_every == 0:
            self.update_sigma_table()

    @torch.no_grad()
    def update_sigma_table(self) -> None:
        from ssmooth.selection import select_sigma

        dataset = self.trainer.datamodule.train_set
        rank, world = self.global_rank, self.trainer.world_size
        # Every rank takes the same number of positions (the last ones padded with -1), so all_gather lines up.
        share = -(-len(dataset) // world)
        positions = torch.arange(rank * share, min((rank + 1) * share, len(dataset)))
        seed = int(self.meta.get("seed", 0)) * 100_003 + self.current_epoch * 1_009 + rank
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # Selection is forward passes only, the dominant cost of sample-wise training: run it on a channels-last
        # copy (1.4-2x faster conv nets on CPU, docs/PERFORMANCE.md), leaving the training model as it is.
        selector = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        chosen = torch.empty(len(positions), device=self.device)
        points_per_batch = max(1, self.selection_batch_size // self.num_draws)
        for start in range(0, len(positions), points_per_batch):
            batch = positions[start : start + points_per_batch]
            x = dataset.images[batch].to(self.device)
            y = dataset.labels[batch].to(self.device)
            chosen[start : start + len(batch)] = select_sigma(
                selector, x, self.noise.grid, num_samples=self.num_draws, labels=y, generator=generator,
                batch_size=self.selection_batch_size, soft=self.soft)
        index = torch.full((share,), -1, dtype=torch.long, device=self.device)
        index[: len(positions)] = dataset.indices[positions].to(self.device)
        sigma = torch.zeros(share, device=self.device)
        sigma[: len(positions)] = chosen
        if world > 1:
            index, sigma = self.all_gather(index).flatten(), self.all_gather(sigma).flatten()
        keep = index >= 0
        changed = self.noise.update(index[keep], sigma[keep])
        self._log_table(changed)

    def _log_table(self, changed: float) -> None:
        table = self.noise.table[self.trainer.datamodule.train_set.indices.to(self.noise.table.device)]
        metrics = {"sigma/mean": table.mean().item(), "sigma/changed": changed}
        for level in self.noise.grid:
            metrics[f"sigma/frac@{level:g}"] = (table == level).float().mean().item()
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
            experiment = getattr(logger, "experiment", None)
            if type(logger).__name__ == "WandbLogger":
                import wandb

                experiment.log({"sigma/table": wandb.Histogram(table.cpu().numpy()),
                                "trainer/global_step": self.global_step})
