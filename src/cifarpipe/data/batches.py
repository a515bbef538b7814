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

`EpochBatches` (train.loader: device_epoch) yields the same batches, bit for bit, but makes the
whole epoch at once: one gather and one normalisation per epoch, then each batch is a slice, so a
training step launches ~12 fewer ops (what matters when the GPU waits for the host).

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

    Exact: from each channel's histogram of its 256 values (integer counts), so the sums of values
    and of squares are integers, whatever the number of images. 42,500 images (130 M values): 0.3 s
    on a 2-core CPU, against 2.0 s for sums of int64 copies of the values (one run, same result).
    """
    pixels = torch.from_numpy(np.ascontiguousarray(images_u8)).view(-1, 3)
    counts = torch.stack([torch.bincount(pixels[:, c], minlength=256) for c in range(3)]).double()
    values = torch.arange(256, dtype=torch.float64)
    n = pixels.shape[0]
    mean = (counts * values).sum(1) / n
    # sums of integers below 2**53: exact in float64 (130 M values x 255**2 is 8.5e12)
    std = torch.sqrt(torch.clamp((counts * values * values).sum(1) / n - mean ** 2, min=1e-12))
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
        self.alternate = self.flip and augment.flip_mode == "alternating"
        # Padding once up front (zeros, like torchvision's RandomCrop(padding=4); or the edge mirrored):
        # 50000 x 40x40x3 = 240 MB instead of padding every batch.
        if self.pad and augment.padding_mode == "reflect":
            side = torch.arange(-self.pad, 32 + self.pad, device=self.device).abs()
            side = torch.where(side > 31, 62 - side, side)  # -1 -> 1, 32 -> 30: the edge pixel is not repeated
            images = images_u8[:, side][:, :, side]
        else:
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
        if self.alternate:  # each image's first flip is drawn once per training, then it alternates by epoch
            first = torch.rand(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, -1))) < 0.5
            flip = first[order] ^ bool(epoch % 2)
        return tuple(t.to(self.device) for t in (order, dy, dx, flip))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, dy, dx, flip = self._epoch_plan(epoch)
        end = len(self) * self.batch_size if self.drop_last else len(order)
        for start in range(start_step * self.batch_size, end, self.batch_size):
            sl = self._share(start, min(start + self.batch_size, end))
            if sl.start == sl.stop:  # a last evaluation batch smaller than the world: nothing for this rank
                continue
            yield self._gather(order[sl], dy[sl], dx[sl], flip[sl]), self.labels[order[sl]]

    def _gather(self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The normalised crops (and flips) of images `idx`: float NCHW views of NHWC memory."""
        ar = torch.arange(32, device=self.device)
        rows = dy[:, None] + ar  # (B, 32): which padded rows form the crop
        # A flipped crop reads its columns right to left: one gather does crop and flip.
        cols = dx[:, None] + torch.where(flip[:, None], 31 - ar, ar)
        pixel = (idx[:, None, None] * self.side + rows[:, :, None]) * self.side + cols[:, None, :]
        x = self.pixels.index_select(0, pixel.view(-1)).view(len(idx), 32, 32, 3)  # uint8 NHWC
        return torch.addcmul(self.shift, x.permute(0, 3, 1, 2).float(), self.scale)

    def _share(self, start: int, stop: int) -> slice:
        """This process's part of the batch order[start:stop]: as torch.tensor_split cuts it (the
        first `size % world_size` parts one image larger)."""
        size, k = stop - start, self.rank
        base, extra = divmod(size, self.world_size)
        lo = start + k * base + min(k, extra)
        return slice(lo, lo + base + (1 if k < extra else 0))


class EpochBatches(DeviceBatches):
    """DeviceBatches' batches, the whole epoch's made at once (in chunks of CHUNK images, which bound
    the index arithmetic's memory: 8192 x 1024 pixels x 8 bytes = 64 MB). The values are the same as
    DeviceBatches' bit for bit: the same plan, the same gather and normalisation, per image."""

    CHUNK = 8192

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, dy, dx, flip = self._epoch_plan(epoch)
        end = len(self) * self.batch_size if self.drop_last else len(order)
        first = start_step * self.batch_size  # a resumed epoch makes only what is left of it
        x = torch.cat([self._gather(order[i:i + self.CHUNK], dy[i:i + self.CHUNK], dx[i:i + self.CHUNK],
                                    flip[i:i + self.CHUNK]) for i in range(first, end, self.CHUNK)])
        y = self.labels[order[first:end]]
        for start in range(first, end, self.batch_size):
            sl = self._share(start, min(start + self.batch_size, end))
            if sl.start != sl.stop:
                yield x[sl.start - first:sl.stop - first], y[sl.start - first:sl.stop - first]


def whitening_images(images_u8: torch.Tensor, mean: list[float], std: list[float], n: int = 5000) -> torch.Tensor:
    """The first `n` training images, normalised as the batches are: what airnet's whitening layer is
    computed from (5000 images give 4.8 M 2x2 patches: a 12x12 covariance estimated far beyond need)."""
    return next(DeviceBatches(images_u8[:n], torch.zeros(min(n, len(images_u8)), dtype=torch.long), n, mean, std,
                              shuffle=False).epoch(0))[0]


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
