"""The device-resident batch path, checked on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarpipe.config import AugmentParams
from cifarpipe.data.batches import DeviceBatches, channel_stats, dataloader_batches, epoch_seed

AUG = AugmentParams(enabled=True, crop_padding=4, flip=True)
NO_AUG = AugmentParams(enabled=False, crop_padding=4, flip=True)


def numbered_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i (mod 256) and labelled i % 10: batches reveal what they hold."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    return images, torch.arange(n) % 10


def identity(images, labels, batch_size, augment=NO_AUG, seed=0, shuffle=True):
    # mean 0 and std 1/255 undo the normalisation: batch values are raw pixel values.
    return DeviceBatches(images, labels, batch_size, [0.0] * 3, [1 / 255] * 3, augment, seed=seed, shuffle=shuffle)


def test_every_index_appears_once_per_epoch_including_the_last_short_batch():
    images, labels = numbered_images(250)
    batches = identity(images, labels, 64)
    assert len(batches) == 4
    seen = []
    for x, y in batches.epoch(0):
        seen += x[:, 0, 16, 16].round().long().tolist()
    assert sorted(seen) == list(range(250))


def test_training_batches_drop_the_short_last_batch_and_leave_out_other_images_each_epoch():
    images, labels = numbered_images(250)
    batches = DeviceBatches(images, labels, 64, [0.0] * 3, [1 / 255] * 3, NO_AUG, seed=3, drop_last=True)
    assert len(batches) == 3
    left_out = []
    for epoch in (0, 1):
        seen = []
        for x, y in batches.epoch(epoch):
            assert len(y) == 64  # never a 58-image (or 4-image) step
            seen += x[:, 0, 16, 16].round().long().tolist()
        assert len(seen) == len(set(seen)) == 192
        left_out.append(set(range(250)) - set(seen))
    assert left_out[0] != left_out[1]
    resumed = list(batches.epoch(1, start_step=2))
    assert len(resumed) == 1 and len(resumed[0][1]) == 64


def test_a_batch_larger_than_the_training_set_is_refused_when_dropping_the_last_batch():
    images, labels = numbered_images(10)
    with pytest.raises(ValueError, match="larger than the 10 images"):
        DeviceBatches(images, labels, 64, [0.0] * 3, [1.0] * 3, drop_last=True)


def test_labels_stay_aligned_with_their_images_under_augmentation():
    images, labels = numbered_images(200)
    for x, y in identity(images, labels, 32, AUG).epoch(3):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        # Every crop of 32 from 40 keeps pixels 4..27 of the original image: the centre is never padding.
        centre = x[:, 0, 16, 16].round().long()
        assert torch.equal(centre % 10, y)


def test_same_seed_same_batches_other_seed_or_epoch_other_batches():
    images = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))

    def first(seed, epoch):
        return next(iter(identity(images, labels, 50, AUG, seed=seed).epoch(epoch)))[0]

    assert torch.equal(first(1, 0), first(1, 0))
    assert not torch.equal(first(1, 0), first(2, 0))
    assert not torch.equal(first(1, 0), first(1, 1))


def test_every_seed_the_schema_accepts_gives_batches_and_small_seeds_keep_theirs():
    """train.seed >= 2**45 passed validation, then crashed in epoch 1 (after the MLflow run was
    created) with "Overflow when unpacking long long": seed * 1_000_003 + epoch went past 64 bits."""
    images, labels = numbered_images(40)
    for seed in (2**32 - 1, 2**45, 2**64 - 1):  # the schema's largest, and larger ones the library still takes
        assert len(list(identity(images, labels, 8, AUG, seed=seed).epoch(3))) == 5
        loader = dataloader_batches(images.numpy(), labels.numpy(), 8, [0.0] * 3, [1.0] * 3, AUG, seed=seed, epoch=3)
        assert len(list(loader)) == 5
    assert (epoch_seed(0, 1), epoch_seed(7, 3)) == (1, 7 * 1_000_003 + 3)  # unchanged: the same batches as before



def test_seeds_2_to_the_32_apart_train_alike_which_is_why_the_schema_stops_below():
    """torch's CPU generator keeps a seed's low 32 bits: train.seed 2**45 trained bit for bit as
    seed 0 (same weights at the start, same batches), while MLflow recorded another seed. The
    schema's SEED_MAX is the largest seed that trains differently from all smaller ones."""
    from cifarpipe.config import SEED_MAX

    def stream(seed: int) -> list[float]:
        torch.manual_seed(seed)
        return torch.rand(4).tolist() + torch.randperm(8, generator=torch.Generator().manual_seed(seed)).tolist()
    assert SEED_MAX == 2**32 - 1
    assert stream(0) == stream(2**32) == stream(2**45) and stream(7) == stream(2**32 + 7)
    assert stream(0) != stream(1) and stream(SEED_MAX) != stream(0)


def test_resuming_mid_epoch_continues_with_exactly_the_remaining_batches():
    images = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    batches = identity(images, labels, 50, AUG, seed=5)
    full = list(batches.epoch(2))
    rest = list(batches.epoch(2, start_step=4))
    assert len(rest) == 2
    for (a, ya), (b, yb) in zip(full[4:], rest):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_crop_and_flip_do_what_they_say_on_a_hand_made_image():
    # One image whose pixel (r, c) holds 8*r + c mod 256: position is readable from value.
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = ((8 * rows + cols) % 256).to(torch.uint8)[None, :, :, None].expand(1, 32, 32, 3).contiguous()
    b = identity(img, torch.zeros(1, dtype=torch.long), 1, AUG, shuffle=False)
    order, dy, dx, flip = b._epoch_plan(0)
    x = next(iter(b.epoch(0)))[0][0, 0].round().long()
    padded = torch.nn.functional.pad(img[0, :, :, 0].long(), (4, 4, 4, 4))
    expected = padded[dy[0]:dy[0] + 32, dx[0]:dx[0] + 32]
    if flip[0]:
        expected = expected.flip(1)
    assert torch.equal(x, expected)

    # Over many draws: all 9x9 offsets and both flips occur.
    many = identity(img.expand(2000, 32, 32, 3).contiguous(), torch.zeros(2000, dtype=torch.long), 2000, AUG)
    _, dy, dx, flip = many._epoch_plan(0)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.4 < flip.float().mean() < 0.6


def test_without_augmentation_images_pass_unchanged():
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    x, _ = next(iter(identity(images, torch.zeros(10, dtype=torch.long), 10, shuffle=False).epoch(0)))
    assert torch.equal(x.round().to(torch.uint8), images.permute(0, 3, 1, 2))


def test_normalisation_uses_the_channel_statistics():
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-9)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255, rtol=1e-6)
    b = DeviceBatches(torch.from_numpy(images), torch.zeros(64, dtype=torch.long), 64, mean, std, shuffle=False)
    x, _ = next(iter(b.epoch(0)))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_the_course_dataloader_path_yields_the_same_shapes():
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    loader = dataloader_batches(images, np.arange(20) % 10, 8, [0.5] * 3, [0.25] * 3, AUG, seed=0, epoch=0)
    shapes = [(x.shape, y.shape) for x, y in loader]
    assert shapes[0] == ((8, 3, 32, 32), (8,)) and sum(s[1][0] for s in shapes) == 20


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_split_each_batch_into_disjoint_parts_that_make_up_one_process_batch(world_size):
    """Distributed training: the parts of all ranks, in rank order, are exactly one process's batch
    (images and augmentation), at any start step; a short last batch is shared out too."""
    images, labels = numbered_images(250)

    def batches(rank: int, world: int, drop_last: bool):
        return DeviceBatches(images, labels, 48, [0.0] * 3, [1 / 255] * 3, AUG, seed=5, drop_last=drop_last,
                             rank=rank, world_size=world)

    for drop_last in (True, False):
        whole = list(batches(0, 1, drop_last).epoch(2, start_step=1))
        parts = [list(batches(r, world_size, drop_last).epoch(2, start_step=1)) for r in range(world_size)]
        assert all(len(p) == len(whole) for p in parts)
        assert len(batches(1, world_size, drop_last)) == len(batches(0, 1, drop_last))  # steps per epoch
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
            sizes = [len(p[i][1]) for p in parts]
            assert max(sizes) - min(sizes) <= 1
