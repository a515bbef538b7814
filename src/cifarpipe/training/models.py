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


def build_model(params: ModelParams, num_classes: int = 10) -> nn.Module:
    if params.name == "course_cnn":
        return CourseCNN(num_classes)
    if params.name == "cifar_resnet":
        return CifarResNet(params.width, num_classes)
    raise ValueError(f"unknown model.name {params.name!r}")  # unreachable: the schema lists the names
