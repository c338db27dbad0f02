"""The small fast CNN used by default on CPU.

Three conv blocks, global average pooling, and a single Linear head. The analysis layer
(input of the Linear) is then the pooled feature vector, where SODA's causal attribution
separated backdoored from clean models best in our measurements (docs/detection.md).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv(w) -> pool -> conv(2w) -> pool -> conv(4w) -> global avg pool -> Linear (w = 32).

    Width 48 was tried as the default: better clean accuracy and attack success, but the
    detector no longer separated clean from backdoored models (docs/training.md).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@register_model("cnn", "small fast CNN (3 conv blocks, GAP, Linear); the CPU default",
                study_ana_layers={1: "fc:input"})
def cnn(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    return SmallCNN(num_classes, in_channels)
