"""Cutting a network in two (analysis/split.py) and the repair that tunes only the tail."""

import copy

import pytest
import torch
from torch import nn

from soda_backdoor.analysis import LayerRef
from soda_backdoor.analysis.split import deepest_split, split_after
from soda_backdoor.errors import UserInputError
from soda_backdoor.models.registry import create_model
from soda_backdoor.repair import RepairConfig, repair_model
from soda_backdoor.training import predict, predict_shared


@pytest.mark.parametrize("arch,layer", [("cnn", "features.7"), ("lenet", "features"), ("resnet18", "layer3"),
                                        ("MobileNetV2", "layers.14")])
def test_tail_of_prefix_is_the_model_and_shares_its_weights(arch, layer):
    torch.manual_seed(0)
    side = 28 if arch in ("cnn", "lenet") else 32
    model = create_model(arch, num_classes=10, in_channels=1, input_size=side).eval()
    x = torch.randn(3, 1, side, side)
    split = deepest_split(model, x)
    assert split.layer == layer
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.prefix(x)), model(x))
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in split.tail.parameters()} <= ids
    tail_share = sum(p.numel() for p in split.tail.parameters()) / sum(p.numel() for p in model.parameters())
    assert tail_share >= 0.5


def test_split_refuses_a_cut_that_a_skip_connection_crosses_and_unknown_names():
    model = create_model("resnet18", num_classes=10, in_channels=1, input_size=32)
    with pytest.raises(UserInputError, match="skip connection"):
        split_after(model, "layer4.0.conv1")
    with pytest.raises(UserInputError, match="no module"):
        split_after(model, "layer9")


def test_tail_repair_leaves_the_prefix_untouched_and_changes_the_tail():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    res = repair_model(model, LayerRef("5", "input"), torch.rand(8), x, y, torch.randn(10, 1, 6, 6), source=0,
                       target=2, config=RepairConfig(epochs=2, batch_size=16, num_recon=4, lr=0.05, tune_from="2"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("0.weight", "0.bias"))
    assert not torch.equal(before["3.weight"], after["3.weight"])
    assert len(res.history) == 2 and not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_on_the_models_modules_act_in_the_halves():
    """The repair's mask is a hook on the model's module: the tail must call that same module."""
    from soda_backdoor.analysis import intervene

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    split = split_after(model, "0")
    with torch.no_grad(), intervene(model, LayerRef("3", "input"), lambda h: h * 0):
        out = split.tail(split.prefix(torch.randn(4, 1, 4, 4)))
    torch.testing.assert_close(out, model[3].bias.detach().expand(4, 3))


def test_auto_cut_falls_back_to_every_layer_on_a_model_fx_cannot_trace(caplog):
    from soda_backdoor.repair.repair import _tuned_part

    model = create_model("shufflenetv2", num_classes=10, in_channels=1, input_size=32)
    with caplog.at_level("WARNING"):
        assert _tuned_part(model, torch.randn(2, 1, 32, 32), "auto") is None
    assert "fine-tuning every layer" in caplog.text and "cannot trace" in caplog.text
    with pytest.raises(UserInputError, match="cannot trace"):
        _tuned_part(model, torch.randn(2, 1, 32, 32), "conv1")


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_models_sharing_a_prefix_predict_as_each_whole_model(arch):
    """The repair measures the model before and after in one pass of the untouched layers:
    each model's labels must be those of its own whole-model pass (batch norms folded alike)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1, input_size=28)
    with torch.no_grad():  # batch-norm statistics that are not the identity
        model.train()
        model(torch.randn(64, 1, 28, 28))
    model.eval()
    changed = copy.deepcopy(model)
    x = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    layer = deepest_split(model, x[:1].float()).layer
    with torch.no_grad():
        for p in split_after(changed, layer).tail.parameters():
            p.add_(0.05 * torch.randn_like(p))
    old, new = split_after(model, layer), split_after(changed, layer)
    labels = predict_shared(new.prefix, [old.tail, new.tail], x, (0.3,), (0.3,), batch_size=32)
    assert torch.equal(labels[0], predict(model, x, (0.3,), (0.3,), batch_size=32))
    assert torch.equal(labels[1], predict(changed, x, (0.3,), (0.3,), batch_size=32))
    assert not torch.equal(labels[0], labels[1])
