"""The original SODA study's CIFAR-style architectures (kuangliu/pytorch-cifar naming).

Parameter names and shapes follow the study's ``models/`` folder, so a study state_dict
(``.th``) loads without conversion; so does the order of each model's direct children,
which the study's ``split_model`` indexes. Two deliberate changes:

* ``in_channels`` changes only the first convolution (1 for Fashion-MNIST).
* The final fixed ``avg_pool2d(out, 4)`` is an adaptive average pool to 1x1, so 28x28
  and 32x32 inputs (and others) work; at 32x32 the result is identical to the study's.

Each model ends with an ``nn.Linear`` (the last Linear in ``named_modules()``) whose
input is the pooled penultimate feature vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model


def _pool_flatten(x: Tensor) -> Tensor:
    """Global average pool to 1x1, then flatten to ``(N, C)``."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --------------------------------------------------------------------------- ResNet


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """ResNet shortcut: identity, or a 1x1 conv + batch norm when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1, 3x3, 1x1 convs (x4 expansion) and a shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, four stages, global pool, ``linear``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: list[int],
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(_pool_flatten(out))


@register_model("resnet18", "ResNet-18 (CIFAR stem), as in the SODA study",
                study_ana_layers={6: "linear:input", 5: "layer4", 3: "layer2", 1: "layer1:input"})
def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], 512-d penultimate features."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register_model("resnet50", "ResNet-50 (CIFAR stem), as in the SODA study",
                study_ana_layers={6: "linear:input", 5: "layer4", 3: "layer2", 1: "layer1:input"})
def resnet50(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """ResNet-50: Bottleneck x [3, 4, 6, 3], 2048-d penultimate features."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


# ---------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (+ shortcut at stride 1)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (stride-1 stem and first 24-channel stage), 1280-d features."""

    # (expansion, out_planes, num_blocks, stride)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layers = self._make_layers(in_planes=32)
        self.conv2 = nn.Conv2d(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def _make_layers(self, in_planes: int) -> nn.Sequential:
        layers = []
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(_pool_flatten(out))


@register_model("MobileNetV2", "MobileNetV2 (CIFAR variant), as in the SODA study", aliases=("mobilenetv2",),
                study_ana_layers={4: "linear:input"})
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """MobileNetV2, kuangliu's CIFAR configuration."""
    return MobileNetV2(num_classes, in_channels)


# ------------------------------------------------------------------------------ VGG


_VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """CIFAR VGG with batch norm: ``features`` then a single ``classifier`` Linear(512, n).

    The max pools use ``ceil_mode=True`` (no change at 32x32; keeps 28x28 from shrinking
    to zero), and a parameter-free ``pool`` (global average) precedes the classifier. It is
    registered after ``classifier`` so the children order (features, classifier) is the
    study's.
    """

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = self._make_layers(cfg, in_channels)
        self.classifier = nn.Linear(512, num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._initialize_weights()

    @staticmethod
    def _make_layers(cfg: list[int | str], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1),
                           nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        return nn.Sequential(*layers)

    def _initialize_weights(self) -> None:
        # The study's initialisation (vgg_cifar.py).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(out)


@register_model("vgg11_bn", "VGG-11 with batch norm (CIFAR, single Linear head), as in the SODA study",
                study_ana_layers={1: "classifier:input"})
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """VGG-11 (configuration A) with batch norm, 512-d penultimate features."""
    return VGG(_VGG11_CFG, num_classes, in_channels)


# ------------------------------------------------------------------------ MobileNet


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv then 1x1 pointwise conv."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, in_planes, kernel_size=3, stride=stride, padding=1,
                               groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)))


class MobileNet(nn.Module):
    """CIFAR MobileNet (v1), 1024-d penultimate features."""

    # (128, 2): 128 planes at stride 2; a bare int is stride 1.
    cfg: list[int | tuple[int, int]] = [64, (128, 2), 128, (256, 2), 256, (512, 2),
                                        512, 512, 512, 512, 512, (1024, 2), 1024]

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layers = self._make_layers(in_planes=32)
        self.linear = nn.Linear(1024, num_classes)

    def _make_layers(self, in_planes: int) -> nn.Sequential:
        layers = []
        for x in self.cfg:
            out_planes, stride = (x, 1) if isinstance(x, int) else x
            layers.append(DepthwiseSeparable(in_planes, out_planes, stride))
            in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.linear(_pool_flatten(self.layers(out)))


@register_model("MobileNet", "MobileNet v1 (CIFAR variant), as in the SODA study", aliases=("mobilenet",),
                study_ana_layers={3: "linear:input"})
def mobilenet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """MobileNet v1, kuangliu's CIFAR configuration."""
    return MobileNet(num_classes, in_channels)


# --------------------------------------------------------------------- ShuffleNetV2


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> [N, c*g, H, W]."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    """Split channels into two parts at ``ratio``."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 basic unit: split, transform one half, concat, shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleDownUnit(nn.Module):
    """ShuffleNetV2 spatial down-sampling unit (stride 2 on both branches)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2 (kuangliu, net_size=1), 1024-d penultimate features."""

    out_channels = (116, 232, 464, 1024)
    num_blocks = (3, 7, 3)

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(self.out_channels[0], self.num_blocks[0])
        self.layer2 = self._make_layer(self.out_channels[1], self.num_blocks[1])
        self.layer3 = self._make_layer(self.out_channels[2], self.num_blocks[2])
        self.conv2 = nn.Conv2d(self.out_channels[2], self.out_channels[3], kernel_size=1, stride=1,
                               padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(self.out_channels[3])
        self.linear = nn.Linear(self.out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleDownUnit(self.in_planes, out_channels)]
        layers += [ShuffleUnit(out_channels) for _ in range(num_blocks)]
        self.in_planes = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(_pool_flatten(out))


@register_model("shufflenetv2", "ShuffleNetV2 x1.0 (kuangliu CIFAR variant)",
                study_ana_layers={6: "linear:input"})
def shufflenetv2(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """ShuffleNetV2, kuangliu's CIFAR version with net_size=1."""
    return ShuffleNetV2(num_classes, in_channels)


# ------------------------------------------------------------------------- DenseNet


class DenseBottleneck(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 conv (4k) then BN-ReLU-3x3 conv (k); concat input."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """DenseNet transition: BN-ReLU-1x1 conv then 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC (kuangliu ``densenet_cifar``: blocks [6, 12, 24, 16], k=12)."""

    def __init__(self, nblocks: tuple[int, int, int, int] = (6, 12, 24, 16), growth_rate: int = 12,
                 reduction: float = 0.5, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, num_planes, kernel_size=3, padding=1, bias=False)

        self.dense1 = self._make_dense_layers(num_planes, nblocks[0])
        num_planes += nblocks[0] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans1 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense2 = self._make_dense_layers(num_planes, nblocks[1])
        num_planes += nblocks[1] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans2 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense3 = self._make_dense_layers(num_planes, nblocks[2])
        num_planes += nblocks[2] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans3 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense4 = self._make_dense_layers(num_planes, nblocks[3])
        num_planes += nblocks[3] * growth_rate

        self.bn = nn.BatchNorm2d(num_planes)
        self.linear = nn.Linear(num_planes, num_classes)

    def _make_dense_layers(self, in_planes: int, nblock: int) -> nn.Sequential:
        layers = []
        for _ in range(nblock):
            layers.append(DenseBottleneck(in_planes, self.growth_rate))
            in_planes += self.growth_rate
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = F.relu(self.bn(self.dense4(out)))
        return self.linear(_pool_flatten(out))


@register_model("densenet", "DenseNet-BC for CIFAR (kuangliu densenet_cifar), as in the SODA study",
                study_ana_layers={9: "linear:input"})
def densenet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """DenseNet-BC, blocks [6, 12, 24, 16], growth rate 12, 384-d penultimate features."""
    return DenseNet((6, 12, 24, 16), 12, 0.5, num_classes, in_channels)
