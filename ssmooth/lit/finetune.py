"""Stages B-C of the method: finetune with a noise level per training sample (docs/METHOD.md)."""
from __future__ import annotations

import copy

import torch
from typing_extensions import override

from ssmooth.lit.module import SmoothingModule
from ssmooth.noise import SampleWiseSigma

SELECTION_RULES = ("local", "full")


class SigmaFinetuneModule(SmoothingModule):
    """Finetunes with ``noise`` = a SampleWiseSigma table, re-selected from the model every ``update_every`` epochs.

    Selection uses the labels of the training samples and ``num_draws`` noise draws per probed level, on the
    un-augmented training images. Two rules:
    - ``full``: every sample, every grid level (len(grid) * num_draws forward passes per sample and update);
    - ``local`` (default): a rotating ``fraction`` of the samples per update moves to the best of its current level
      and the two neighbouring ones. The current level's vote is read off the training steps' own forward passes
      since the sample got that level (free), so only the neighbours cost forward passes: 2 * num_draws *
      fraction per sample and update, about 1.6 at the defaults against 160 for ``full`` (5 levels, 32 draws).
    Under DDP each rank selects for its own share of the samples and the shares are gathered, so every rank holds
    the whole table (it is a buffer: checkpointed with the weights, restored on resume).
    """

    def __init__(self, *args, update_every: int = 1, num_draws: int = 4, soft: bool = True,
                 selection: str = "local", fraction: float = 0.2, selection_batch_size: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.noise, SampleWiseSigma):
            raise TypeError(f"SigmaFinetuneModule needs a SampleWiseSigma policy, got {type(self.noise).__name__}")
        if update_every < 1 or num_draws < 1:
            raise ValueError(f"update_every and num_draws must be >= 1, got {update_every}, {num_draws}")
        if selection not in SELECTION_RULES:
            raise ValueError(f"selection={selection!r} must be one of {SELECTION_RULES}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
        self.update_every, self.num_draws, self.soft = update_every, num_draws, soft
        self.selection, self.fraction = selection, fraction
        self.selection_batch_size = selection_batch_size
        # Running vote at each sample's current level, from the training steps (local rule). Not persistent: after
        # a resume the current level is simply probed afresh.
        size = self.noise.table.numel()
        for name in ("seen_p", "seen_right", "seen_count"):
            self.register_buffer(name, torch.zeros(size), persistent=False)

    @override
    def on_train_epoch_start(self) -> None:
        if self.current_epoch % self.update_every == 0:
            self.update_sigma_table()

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.selection != "local":
            return
        _, y, index = batch
        # Multi-draw objectives return log mean softmax, so this is the soft smoothed vote at the sample's level.
        probs = outputs["logits"].float().softmax(dim=1)
        index = index.to(self.seen_p.device)
        self.seen_p.index_add_(0, index, probs.gather(1, y[:, None]).squeeze(1).to(self.seen_p.device))
        self.seen_right.index_add_(0, index, (probs.argmax(dim=1) == y).float().to(self.seen_p.device))
        self.seen_count.index_add_(0, index, torch.ones_like(index, dtype=self.seen_count.dtype))

    @torch.no_grad()
    def update_sigma_table(self) -> None:
        dataset = self.trainer.datamodule.train_set
        rank, world = self.global_rank, self.trainer.world_size
        # Every rank takes the same number of positions (the last ones padded with -1), so all_gather lines up.
        share = -(-len(dataset) // world)
        positions = torch.arange(rank * share, min((rank + 1) * share, len(dataset)))
        if self.selection == "local":
            period = max(1, round(1 / self.fraction))
            turn = (self.current_epoch // self.update_every) % period
            positions = positions[positions % period == turn]
            share = -(-share // period) + 1  # an upper bound on any rank's count, the same on every rank
        seed = int(self.meta.get("seed", 0)) * 100_003 + self.current_epoch * 1_009 + rank
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # Selection is forward passes only: run it on a channels-last copy (1.4-2x faster conv nets on CPU,
        # docs/PERFORMANCE.md), leaving the training model as it is.
        selector = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        chosen = self._select(selector, dataset, positions, generator)
        index = torch.full((share,), -1, dtype=torch.long, device=self.device)
        index[: len(positions)] = dataset.indices[positions].to(self.device)
        sigma = torch.zeros(share, device=self.device)
        sigma[: len(positions)] = chosen
        if world > 1:
            index, sigma = self.all_gather(index).flatten(), self.all_gather(sigma).flatten()
        keep = index >= 0
        index, sigma = index[keep], sigma[keep]
        moved = index[self.noise.table[index.to(self.noise.table.device)] != sigma.to(self.noise.table.device)]
        changed = self.noise.update(index, sigma)
        for name in ("seen_p", "seen_right", "seen_count"):  # a new level starts a new running vote
            getattr(self, name)[moved.to(self.seen_p.device)] = 0
        self._log_table(changed)

    def _select(self, selector, dataset, positions, generator) -> torch.Tensor:
        from ssmooth.selection import select_neighbour_levels, select_sigma

        grid = torch.tensor(self.noise.grid, device=self.device)
        if self.selection == "local":
            seen = {name: getattr(self, name) for name in ("seen_p", "seen_right", "seen_count")}
            if self.trainer.world_size > 1:  # each rank trained on other samples: add up copies, keep local sums
                seen = {k: self.trainer.strategy.reduce(v.clone(), reduce_op="sum") for k, v in seen.items()}
        chosen = torch.empty(len(positions), device=self.device)
        draws = self.num_draws * (2 if self.selection == "local" else len(grid))
        points_per_batch = max(1, self.selection_batch_size // draws)
        for start in range(0, len(positions), points_per_batch):
            batch = positions[start : start + points_per_batch]
            x = dataset.images[batch].to(self.device)
            y = dataset.labels[batch].to(self.device)
            if self.selection == "full":
                chosen[start : start + len(batch)] = select_sigma(
                    selector, x, self.noise.grid, num_samples=self.num_draws, labels=y, generator=generator,
                    batch_size=self.selection_batch_size, soft=self.soft)
                continue
            index = dataset.indices[batch].to(self.seen_p.device)
            count = seen["seen_count"][index]
            estimate = (torch.where(count > 0, seen["seen_p"][index] / count.clamp(min=1), float("nan")),
                        seen["seen_right"][index] > count / 2)
            current = (self.noise.table[index.to(self.noise.table.device)].to(self.device)[:, None]
                       - grid).abs().argmin(dim=1)
            level = select_neighbour_levels(
                selector, x, y, current, self.noise.grid, num_samples=self.num_draws, generator=generator,
                batch_size=self.selection_batch_size, soft=self.soft, current_estimate=estimate)
            chosen[start : start + len(batch)] = grid[level]
        return chosen

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
