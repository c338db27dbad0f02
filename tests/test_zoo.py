"""Every registered architecture builds, runs at 28x28 / 32x32, and keeps the study's names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soda_backdoor.models.registry import create_model, get_model_spec, list_models


SHAPES = [(1, 28), (3, 32)]  # (in_channels, input_size): Fashion-MNIST-like and CIFAR-like


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears, "model has no nn.Linear"
    return linears[-1]


@pytest.mark.parametrize("in_channels,size", SHAPES, ids=[f"c{c}_s{s}" for c, s in SHAPES])
@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_head(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels, input_size=size).eval()
    head = _last_linear(model)
    assert head.out_features == 7
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
        handle.remove()
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        # The last Linear is the head: its input is the penultimate vector, its output the logits.
        assert len(seen) == 1 and seen[0].shape == (2, head.in_features)
        assert torch.allclose(head(seen[0]), out)


def test_aliases_resolve() -> None:
    assert get_model_spec("mobilenetv2").name == "MobileNetV2"
    assert get_model_spec("mobilenet").name == "MobileNet"
    for name in ("resnet18", "resnet50", "MobileNetV2", "vgg11_bn", "MobileNet", "shufflenetv2", "densenet"):
        assert name in list_models()


def test_study_state_dict_names() -> None:
    keys = set(create_model("resnet18", num_classes=10, in_channels=3).state_dict())
    assert {"conv1.weight", "layer4.1.bn2.running_mean", "linear.weight", "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_var"} <= keys
    keys = set(create_model("MobileNetV2", num_classes=10, in_channels=3).state_dict())
    assert {"layers.0.conv1.weight", "conv2.weight", "bn2.weight", "linear.weight"} <= keys
    keys = set(create_model("vgg11_bn", num_classes=10, in_channels=3).state_dict())
    assert all(k.startswith(("features.", "classifier.")) for k in keys)
    assert "features.0.weight" in keys and "classifier.weight" in keys


def test_in_channels_changes_only_first_conv() -> None:
    for name in list_models():
        a = create_model(name, num_classes=10, in_channels=3).state_dict()
        b = create_model(name, num_classes=10, in_channels=1).state_dict()
        assert a.keys() == b.keys()
        differ = [k for k in a if a[k].shape != b[k].shape]
        assert len(differ) == 1 and differ[0].endswith("weight"), (name, differ)
