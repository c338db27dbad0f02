"""A LeNet-5-style network: two conv/pool stages, flatten, three fully connected layers.

LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998,
with the modern ReLU and max pooling. Unlike ``cnn`` (global average pooling and one Linear),
its head is a flatten + MLP, the head on which the penultimate-layer analysis is known to be
harder (docs/method.md); the model zoo holds both (docs/zoo.md).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class LeNet5(nn.Module):
    """conv5(6) -> pool -> conv5(16) -> pool -> flatten -> fc(120) -> fc(84) -> fc(classes).

    The first convolution is padded by 2 (28x28 inputs give LeNet's 32x32 geometry); the
    flattened size follows ``input_size``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        side = ((input_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"lenet needs inputs of at least 12x12 pixels, got {input_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("lenet", "LeNet-5-style CNN (2 conv/pool stages, flatten, 3 fully connected layers)",
                aliases=("lenet5",))
def lenet(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size)
