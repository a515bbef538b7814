"""airnet (airbench94's kind of network), its augmentation and its test-time views, on the CPU in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cifarpipe.config import AugmentParams, ModelParams
from cifarpipe.data.batches import DeviceBatches, EpochBatches
from cifarpipe.serving.inference import Classifier
from cifarpipe.training import engine
from cifarpipe.training.models import AirNet, build_model

AIR_AUG = AugmentParams(enabled=True, crop_padding=2, flip=True, padding_mode="reflect", flip_mode="alternating")


def test_airnet_has_the_published_shape_and_identity_initialised_convs():
    torch.manual_seed(0)
    m = build_model(ModelParams(name="airnet", width=64))
    assert isinstance(m, AirNet)
    assert sum(p.numel() for p in m.parameters()) == 1_972_792  # widths 64, 256, 256
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    frozen = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
    assert "whiten.weight" in frozen and all(n == "whiten.weight" or n.endswith(".weight") and "blocks" in n
                                             for n in frozen)
    assert all(isinstance(m.get_submodule(n.removesuffix(".weight")), torch.nn.BatchNorm2d)
               for n in frozen if n != "whiten.weight")  # the BatchNorm scales, fixed at 1
    bn = m.blocks[0][2]
    assert (bn.momentum, bn.eps) == (0.4, 1e-12)
    conv = m.blocks[1][0]  # 64 -> 256: its first 64 filters pass their channel through
    assert torch.equal(conv.weight[:64], torch.nn.init.dirac_(torch.empty(64, 64, 3, 3)))
    assert conv.weight[64:].abs().sum() > 0  # the others keep their random start
    assert conv.bias is None and m.head.bias is None and m.logit_scale == pytest.approx(1 / 9)


def test_the_whitening_filters_make_the_patches_uncorrelated_with_unit_variance_and_come_in_pairs():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.5, 0.7]])  # correlated colour channels
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 32, 32, generator=g))
    images = images + 0.5 * images.roll(1, dims=3)  # and correlated neighbours
    m = AirNet(width=8)
    m.init_whitening(images)
    w = m.whiten.weight
    assert torch.equal(w[12:], -w[:12])  # each filter and its negative: GELU then passes both signs
    with torch.no_grad():
        out = F.conv2d(images.double(), w[:12].double())  # no bias: only the filters
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-2), cov.diagonal()


def _tiny_airnet() -> AirNet:
    torch.manual_seed(1)
    m = AirNet(width=8).eval()
    m.init_whitening(torch.randn(20, 3, 32, 32))
    return m


def test_flip_translate_averages_six_views_with_the_mirrored_edge():
    m = _tiny_airnet()
    x = torch.randn(4, 3, 32, 32)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():
        def pair(v):
            return (m(v) + m(v.flip(3))) / 2
        expected = pair(x) / 2 + pair(padded[:, :, :32, :32]) / 4 + pair(padded[:, :, 2:, 2:]) / 4
        assert torch.allclose(engine.eval_logits(m, x, tta="flip_translate"), expected, atol=1e-6)
        assert torch.allclose(engine.eval_logits(m, x, tta="flip"), pair(x), atol=1e-6)
        assert torch.equal(engine.eval_logits(m, x, tta="none"), m(x))
    # the up-left view really is shifted: its pixel (1, 1) is the image's (0, 0)
    assert torch.equal(padded[:, :, :32, :32][:, :, 1, 1], x[:, :, 0, 0])
    with pytest.raises(ValueError, match="tta must be one of"):
        engine.eval_logits(m, x, tta="crop")
    assert engine.views_for("none", True) == "flip" and engine.views_for("flip_translate", False) == "flip_translate"


def test_the_model_from_its_weights_file_predicts_with_the_views_evaluate_uses():
    """cifarpipe-predict and the MLflow model (Classifier) read model.tta from the weights file: their
    classes and logits are evaluate's, including the test-time views."""
    m = _tiny_airnet()
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    weights = {"model": {"name": "airnet", "width": 8, "tta": "flip_translate"}, "state_dict": m.state_dict(),
               "mean": mean, "std": std, "classes": [f"c{i}" for i in range(10)]}
    classifier = Classifier.from_weights(weights)
    assert classifier.tta == "flip_translate"
    batches = DeviceBatches(images, torch.zeros(40, dtype=torch.long), 16, mean, std, shuffle=False)
    with torch.no_grad():
        evaluated = torch.cat([engine.eval_logits(m, x, tta="flip_translate") for x, _ in batches.epoch(0)])
    assert torch.equal(classifier.logits(images.numpy()), evaluated)
    assert (classifier.predict(images.numpy())["class_index"].to_numpy() == evaluated.argmax(1).numpy()).all()
    old = Classifier.from_weights({**weights, "model": {"name": "airnet", "width": 8}})  # written before model.tta
    assert old.tta == "none" and torch.equal(old.logits(images.numpy()), m(batches_x(batches)))


def batches_x(batches: DeviceBatches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([x for x, _ in batches.epoch(0)])


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i: pixel (r, c) = r * 4 + c % 4 + i % 3, so rows, columns and images can be told apart."""
    r = torch.arange(32).view(32, 1)
    c = torch.arange(32).view(1, 32)
    images = torch.stack([(r * 4 + c % 4 + i % 3) for i in range(n)]).to(torch.uint8)
    return images[..., None].expand(n, 32, 32, 3).contiguous(), torch.arange(n) % 10


def test_reflect_padding_mirrors_the_edge_without_repeating_it():
    images, labels = numbered(8)
    b = DeviceBatches(images, labels, 8, [0.0] * 3, [1 / 255] * 3, AIR_AUG, seed=0)
    padded = b.pixels.view(8, 36, 36, 3)[..., 0].long()
    expected = torch.from_numpy(np.pad(images[..., 0].numpy(), ((0, 0), (2, 2), (2, 2)), mode="reflect")).long()
    assert torch.equal(padded, expected)


def test_alternating_flips_flip_each_image_in_every_other_epoch():
    images, labels = numbered(64)
    b = DeviceBatches(images, labels, 64, [0.0] * 3, [1 / 255] * 3, AIR_AUG, seed=5)
    flips = []
    for epoch in range(4):
        order, _, _, flip = b._epoch_plan(epoch)
        per_image = torch.empty(64, dtype=torch.bool)
        per_image[order] = flip
        flips.append(per_image)
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], ~flips[0])
    assert 16 < flips[0].sum() < 48  # the first epoch's choice is random, about half
    random = DeviceBatches(images, labels, 64, [0.0] * 3, [1 / 255] * 3,
                           AIR_AUG.model_copy(update={"flip_mode": "random"}), seed=5)
    assert not torch.equal(random._epoch_plan(1)[3], ~random._epoch_plan(0)[3])


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3)])
def test_whole_epoch_batches_are_the_per_batch_path_bit_for_bit_also_when_resumed(rank, world_size):
    images = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (300,))
    args = (images, labels, 32, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], AIR_AUG)
    kw = {"seed": 3, "drop_last": True, "rank": rank, "world_size": world_size}
    EpochBatches.CHUNK = 100  # several chunks, one cut inside a batch
    try:
        for epoch, start in ((0, 0), (1, 0), (1, 4)):
            a = list(DeviceBatches(*args, **kw).epoch(epoch, start))
            b = list(EpochBatches(*args, **kw).epoch(epoch, start))
            assert len(a) == len(b) == 9 - start
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.stride() == xb.stride()
    finally:
        EpochBatches.CHUNK = 8192
