"""The networks, chosen by `model.name` in params.yaml."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cifarpipe.config import ModelParams


class CourseCNN(nn.Module):
    """The course's network: two 5x5 convs with 2x2 max-pooling, then 400 -> 120 -> 84 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # 3x32x32 -> 6x14x14
        x = self.pool(F.relu(self.conv2(x)))  # -> 16x5x5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    # bias=False: the BatchNorm that follows has its own shift.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class _Stage(nn.Module):
    """conv -> 2x2 max-pool (halves the resolution) -> a residual pair of convs."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(c_out), nn.GELU())
        self.res = nn.Sequential(_conv_bn(c_out, c_out), _conv_bn(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.res(x)


class CifarResNet(nn.Module):
    """A compact residual CNN for 32x32 images: 10 conv layers at resolutions 32, 16, 8 and 4.

    Widths w, w, 2w, 4w (64, 64, 128, 256 by default: 1.96 M parameters). Max-pooling inside each stage and
    a global max-pool head keep it shallow and fast; the logits are scaled down (x 1/8) so the
    softmax starts soft, which lets Adam at lr 1e-3 train it from the first step.
    """

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, width)
        self.stages = nn.Sequential(_Stage(width, width), _Stage(width, 2 * width), _Stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes, bias=False)
        self.logit_scale = 0.125

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.logit_scale


class _IdentityConv(nn.Conv2d):
    """3x3 conv, no bias (a BatchNorm follows), whose first `c_in` filters start as the identity: at
    initialisation the block passes its input through, plus the randomly initialised extra filters."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:c_in])


def _frozen_scale_bn(c: int) -> nn.BatchNorm2d:
    # momentum 0.4: the running statistics follow ~2.5 recent batches, enough for 10-epoch trainings of
    # ~40 steps each; eps 1e-12: no floor under small variances. The scale stays 1 (not trained): the
    # next conv's weights scale anyway, and the shift is then the layer's one parameter.
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


class _AirBlock(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(_IdentityConv(c_in, c_out), nn.MaxPool2d(2), _frozen_scale_bn(c_out), nn.GELU(),
                         _IdentityConv(c_out, c_out), _frozen_scale_bn(c_out), nn.GELU())


class AirNet(nn.Module):
    """A network of airbench94's kind (Keller Jordan, arXiv:2404.00498), written from its description.

    A frozen 2x2 patch-whitening conv (24 filters: the 12 eigenvectors of the training images' 2x2x3
    patch covariance, scaled to unit variance, and their negatives), GELU, then three blocks of
    widths w, 4w, 4w (64, 256, 256 by default: 1.97 M parameters) at resolutions 31, 15 and 7, a 3x3
    max-pool to 1x1, and a bias-free linear head whose logits are scaled by 1/9 so the softmax starts
    soft. `init_whitening` must see training images before training (the train stage does it; the
    weights are then in every checkpoint and weights file).
    """

    WHITEN_EPS = 5e-4  # added to the eigenvalues: directions with almost no variance are not blown up

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 32x32 -> 31x31, no padding
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()
        self.blocks = nn.Sequential(_AirBlock(24, width), _AirBlock(width, 4 * width), _AirBlock(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes, bias=False)
        self.logit_scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))  # -> 4w x 3 x 3
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images (N, 3, 32, 32). The covariance is
        summed in float64 where the images are (on an H200 a few ms for 5000 images; the 2-core CPU
        takes ~0.3 s), its 12x12 eigendecomposition on the CPU; every process of a job computes the
        same filters, and a resumed job reads them from its checkpoint."""
        x = images.detach().to(torch.float64)
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, 31, 31, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)  # one row per patch, in (c, kh, kw) order
        patches = patches - patches.mean(0)
        covariance = (patches.T @ patches / len(patches)).cpu()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + self.WHITEN_EPS)[:, None]
        self.whiten.weight.copy_(torch.cat([filters, -filters]).view(24, 3, 2, 2))


def build_model(params: ModelParams, num_classes: int = 10) -> nn.Module:
    if params.name == "course_cnn":
        return CourseCNN(num_classes)
    if params.name == "cifar_resnet":
        return CifarResNet(params.width, num_classes)
    if params.name == "airnet":
        return AirNet(params.width, num_classes)
    raise ValueError(f"unknown model.name {params.name!r}")  # unreachable: the schema lists the names
