"""Batches for training and evaluation.

`DeviceBatches` is the fast path: the whole uint8 dataset lives on the training device, every
batch is an index slice of a per-epoch permutation, and the random crop and flip are one gather
over the whole batch. No worker processes, no per-image Python. All randomness of epoch e comes
from a CPU generator seeded with (seed, e), so batches are identical on any device and an
interrupted epoch can be resumed at any step.

Training drops each epoch's incomplete last batch (`drop_last`): 42,500 training images leave 4
over in batches of 64, 128 or 512, and a full optimizer step (and BatchNorm update) on 4 images
would land right before validation, the scheduler's decision and the saved weights
(benchmarks/last_batch.py measures both ways). The permutation differs every epoch, so each
epoch leaves out other images. Evaluation keeps every image.

`dataloader_batches` is the course's path (torch DataLoader, per-image transforms), kept as
the baseline the benchmarks compare against.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional as F

from cifarpipe.config import AugmentParams


def epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, epoch); 1_000_003 is a prime > any epoch count.
    # Modulo 2**64, what torch.Generator.manual_seed takes: the same value as before for every seed
    # below 2**44 (the same batches), and no "Overflow when unpacking long long" in epoch 1 above it.
    return (seed * 1_000_003 + epoch) % 2**64


def channel_stats(images_u8: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of HWC uint8 images, in 0..1 units (the normalisation constants).

    Exact integer sums, 5000 images (15 MB as int64) at a time, instead of one 1 GB float64 copy.
    """
    total = np.zeros(3, np.int64)
    squares = np.zeros(3, np.int64)
    for i in range(0, len(images_u8), 5000):
        chunk = images_u8[i:i + 5000].reshape(-1, 3).astype(np.int64)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    n = len(images_u8) * 32 * 32
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 1e-12))
    return (mean / 255).tolist(), (std / 255).tolist()


class DeviceBatches:
    """Yields normalised float batches (NCHW view of NHWC memory = channels_last) from device-resident uint8."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: list[float], std: list[float], augment: AugmentParams | None = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if images_u8.dtype != torch.uint8 or images_u8.shape[1:] != (32, 32, 3):
            raise ValueError("images must be uint8 (n, 32, 32, 3)")
        self.device = images_u8.device
        self.pad = augment.crop_padding if augment and augment.enabled else 0
        self.flip = bool(augment and augment.enabled and augment.flip)
        # Padding once up front (zeros, like torchvision's RandomCrop(padding=4)): 50000 x 40x40x3
        # = 240 MB instead of padding every batch.
        images = F.pad(images_u8, (0, 0, self.pad, self.pad, self.pad, self.pad)) if self.pad else images_u8
        self.side = 32 + 2 * self.pad
        # One row of 3 bytes per pixel: a crop is then one index_select of pixel rows, which measured
        # 3.3x faster than the equivalent 3-tensor advanced index (0.26 vs 0.88 ms per 128 images, CPU).
        self.pixels = images.contiguous().view(-1, 3)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        # Distributed training: every process draws the same plan (same seed) and takes part
        # `rank` of each batch, so the processes together train on exactly the batches one process
        # would, the number of steps per epoch does not depend on the world size, and a checkpoint
        # (epoch, step) resumes in any number of processes.
        self.rank, self.world_size = rank, world_size
        if drop_last and len(self.labels) < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the {len(self.labels)} images: no full batch")
        # (x - mean) / std as one x * scale + shift (addcmul): half the passes over the batch.
        std_255 = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.scale = 1 / std_255
        self.shift = -torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255 / std_255

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.labels) // self.batch_size
        return -(-len(self.labels) // self.batch_size)  # the last batch may be smaller

    def _epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Order and per-image crop offsets and flips for one epoch, drawn on the CPU (device-independent)."""
        n = len(self.labels)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g) if self.pad else torch.zeros(n, dtype=torch.long)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g) if self.pad else torch.zeros(n, dtype=torch.long)
        flip = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return tuple(t.to(self.device) for t in (order, dy, dx, flip))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, dy, dx, flip = self._epoch_plan(epoch)
        ar = torch.arange(32, device=self.device)
        end = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(start_step * self.batch_size, end, self.batch_size):
            sl = self._share(start, min(start + self.batch_size, end))
            if sl.start == sl.stop:  # a last evaluation batch smaller than the world: nothing for this rank
                continue
            idx = order[sl]
            rows = dy[sl, None] + ar  # (B, 32): which padded rows form the crop
            # A flipped crop reads its columns right to left: one gather does crop and flip.
            cols = dx[sl, None] + torch.where(flip[sl, None], 31 - ar, ar)
            pixel = (idx[:, None, None] * self.side + rows[:, :, None]) * self.side + cols[:, None, :]
            x = self.pixels.index_select(0, pixel.view(-1)).view(len(idx), 32, 32, 3)  # uint8 NHWC
            yield torch.addcmul(self.shift, x.permute(0, 3, 1, 2).float(), self.scale), self.labels[idx]

    def _share(self, start: int, stop: int) -> slice:
        """This process's part of the batch order[start:stop]: as torch.tensor_split cuts it (the
        first `size % world_size` parts one image larger)."""
        size, k = stop - start, self.rank
        base, extra = divmod(size, self.world_size)
        lo = start + k * base + min(k, extra)
        return slice(lo, lo + base + (1 if k < extra else 0))


class _ArrayDataset(torch.utils.data.Dataset):
    """The course's per-image path: HWC uint8 -> torchvision transforms, one image at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def dataloader_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, mean: list[float],
                       std: list[float], augment: AugmentParams | None, seed: int, epoch: int,
                       num_workers: int = 0, shuffle: bool = True, drop_last: bool = False
                       ) -> torch.utils.data.DataLoader:
    from torchvision import transforms as T  # imported here: only the baseline path needs torchvision

    steps = [T.ToPILImage()]
    if augment and augment.enabled:
        if augment.crop_padding:
            steps.append(T.RandomCrop(32, padding=augment.crop_padding))
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.utils.data.DataLoader(_ArrayDataset(images, labels, T.Compose(steps)), batch_size=batch_size,
                                       shuffle=shuffle, generator=g, num_workers=num_workers, drop_last=drop_last)
