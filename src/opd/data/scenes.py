"""Pre-training data: random mini-world scenes rendered on the fly with truthful captions."""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class SceneStream(IterableDataset):
    """An endless stream of ``{"image": [3, H, W] in [0, 1], "prompt": str}``.

    Each (rank, worker) pair draws from its own seeded generator, so streams never repeat each
    other and a run is reproducible for a fixed number of workers and processes.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, sign_fraction: float = 0.5) -> None:
        self.image_size = image_size
        self.seed = seed
        self.sign_fraction = sign_fraction

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from opd.data.world.layout import random_scene
        from opd.data.world.render import render

        info = get_worker_info()
        worker = info.id if info is not None else 0
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = random.Random(f"{self.seed}/{rank}/{worker}")
        while True:
            scene, prompt, _ = random_scene(rng, sign_fraction=self.sign_fraction)
            image = np.asarray(render(scene, self.image_size), dtype=np.float32) / 255.0
            yield {"image": torch.from_numpy(image).permute(2, 0, 1), "prompt": prompt}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": torch.stack([i["image"] for i in items]), "prompts": [i["prompt"] for i in items]}


class SceneDataModule(pl.LightningDataModule):
    """Batches of rendered scenes for flow-matching pre-training."""

    def __init__(self, image_size: int = 64, batch_size: int = 64, num_workers: int = 2, seed: int = 0,
                 sign_fraction: float = 0.5) -> None:
        super().__init__()
        self.sign_fraction = sign_fraction
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SceneStream(self.image_size, self.seed, self.sign_fraction), batch_size=self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
