"""Classifiers: an MLP on raw pixels and a small CNN for quick runs, ResNet-18/34 in the CIFAR
form (3x3 stem, no max-pool) as in the paper's small-image experiments."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet34

MODEL_NAMES = ("mlp", "small-cnn", "resnet18", "resnet34")


class MLP(nn.Module):
    """Raw pixels -> two hidden ReLU layers -> classes. Over-fits small or noisy training sets
    readily (the over-confident regimes of docs/trainer.md); seconds per epoch on CPU."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks + linear head: ~0.1 M parameters, seconds per epoch on 28x28 on CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def cifar_resnet(depth: int, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem: small images lose too much to a 7x7/2 conv
    followed by a max-pool."""
    model = {18: resnet18, 34: resnet34}[depth](num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, in_channels: int, num_classes: int, image_size: int = 28) -> nn.Module:
    """``image_size`` (the side of the square inputs) matters only for the MLP."""
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes)
    if name == "small-cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "resnet18":
        return cifar_resnet(18, in_channels, num_classes)
    if name == "resnet34":
        return cifar_resnet(34, in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
