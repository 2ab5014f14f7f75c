"""Pre-training data: random mini-world scenes rendered on the fly with truthful captions."""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class SceneStream(IterableDataset):
    """An endless stream of ``{"image": [3, H, W] in [0, 1], "prompt": str}``, in batches.

    The stream is a pure function of its position: batch ``n`` (counted from 0 over the whole run)
    of rank ``rank`` is drawn from a generator seeded by ``(seed, rank, n)``, whatever the number
    of data-loader workers (worker ``w`` of ``W`` renders batches ``start_batch + w, + W, ...``, which
    the loader returns in order). Ranks never repeat each other, and a run resumed at batch
    ``start_batch`` sees exactly the batches an uninterrupted run would have.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, sign_fraction: float = 0.5, batch_size: int = 1,
                 start_batch: int = 0, rank: int | None = None) -> None:
        self.image_size = image_size
        self.seed = seed
        self.sign_fraction = sign_fraction
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.rank = rank

    def batch(self, n: int, rank: int = 0) -> list[dict[str, Any]]:
        """The items of batch ``n`` of ``rank``."""
        from opd.data.world.layout import random_scene
        from opd.data.world.render import render

        rng = random.Random(f"{self.seed}/{rank}/{n}")
        out = []
        for _ in range(self.batch_size):
            scene, prompt, _ = random_scene(rng, sign_fraction=self.sign_fraction)
            image = np.asarray(render(scene, self.image_size), dtype=np.float32) / 255.0
            out.append({"image": torch.from_numpy(image).permute(2, 0, 1), "prompt": prompt})
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank = self.rank
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for n in itertools.count(self.start_batch + worker, workers):
            yield from self.batch(n, rank)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": torch.stack([i["image"] for i in items]), "prompts": [i["prompt"] for i in items]}


class SceneDataModule(pl.LightningDataModule):
    """Batches of rendered scenes for flow-matching pre-training. Under a trainer the stream starts
    at the batch after the last one trained (``global_step × accumulate_grad_batches``), so
    ``ckpt_path=last`` continues the data where the interrupted run stopped."""

    def __init__(self, image_size: int = 64, batch_size: int = 64, num_workers: int = 2, seed: int = 0,
                 sign_fraction: float = 0.5) -> None:
        super().__init__()
        self.sign_fraction = sign_fraction
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else None
        stream = SceneStream(self.image_size, self.seed, self.sign_fraction, batch_size=self.batch_size,
                             start_batch=start, rank=rank)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
