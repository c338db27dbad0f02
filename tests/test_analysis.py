"""Causal attribution: hand-computed values, the affine fast path, chunking, hooks."""

import pytest
import torch
from torch import nn

from soda_backdoor.analysis import (AttributionConfig, LayerRef, class_attribution, compute_neuron_effects,
                                    naive_class_attribution, parse_layer)
from soda_backdoor.errors import UserInputError
from soda_backdoor.models import create_model, list_models


class TwoLayer(nn.Module):
    """h = relu(W1 x); logits = W2 relu(h) : the head after h is non-linear (relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
            self.fc2.weight.copy_(torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_affine_head_attribution_is_weight_magnitude():
    model = TwoLayer().eval()
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    a, kind = class_attribution(model, LayerRef("fc2", "input"), x, AttributionConfig(delta=1.0))
    assert kind == "affine"
    assert torch.allclose(a, model.fc2.weight.abs().t())


def test_nonlinear_head_matches_hand_computation():
    # Analyse at fc1's output: g(h) = W2 relu(h). With x = (1, 2): h = (1, 2, 3), all positive, so
    # adding delta=1 to neuron i changes logit k by |W2[k, i]|. With x = (-1, -2): h = (-1, -2, -3),
    # relu(h + 1) = (0, 0, 0) so nothing changes. The mean over both is |W2| / 2.
    model = TwoLayer().eval()
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    a, kind = class_attribution(model, LayerRef("fc1"), x, AttributionConfig(delta=1.0))
    assert kind == "chain"  # act -> fc2 is a plain module chain to the output
    assert torch.allclose(a, model.fc2.weight.abs().t() / 2)


def test_fast_path_equals_general_path_on_cnn():
    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(16, 1, 28, 28)
    ref = parse_layer(model, None)
    fast, kind = class_attribution(model, ref, x, AttributionConfig())
    slow, kind2 = class_attribution(model, ref, x, AttributionConfig(exact_affine=False, chunk_size=100))
    assert kind == "affine" and kind2 == "chain"
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_batched_equals_naive_at_inner_layer(chunk):
    torch.manual_seed(1)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(10, 1, 28, 28)
    ref = LayerRef("features.5")  # batch norm of the second block; an in-place ReLU follows
    batched, kind = class_attribution(model, ref, x, AttributionConfig(chunk_size=chunk))
    naive = naive_class_attribution(model, ref, x)
    assert kind == "chain"
    assert torch.allclose(batched, naive, atol=1e-4)


def test_skip_connection_falls_back_to_tiled_and_stays_exact():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)  # the head depends on x, not only on a(x)

    torch.manual_seed(0)
    model = Skip().eval()
    x = torch.randn(5, 4)
    batched, kind = class_attribution(model, LayerRef("a"), x, AttributionConfig(chunk_size=6))
    assert kind == "tiled"
    assert torch.allclose(batched, naive_class_attribution(model, LayerRef("a"), x), atol=1e-5)


def test_effects_restore_mode_and_remove_hooks():
    model = create_model("cnn", 10, 1, 28).train()
    ref = parse_layer(model, "features.5")
    eff = compute_neuron_effects(model, ref, {0: torch.randn(4, 1, 28, 28), 1: torch.randn(3, 1, 28, 28)},
                                 AttributionConfig(chunk_size=32))
    assert eff.matrices.shape == (2, model.fc.in_features // 2, 10)  # the second block: 2 x width channels
    assert eff.num_samples == (4, 3)
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_layer_lists_valid_names():
    model = create_model("cnn", 10, 1, 28)
    with pytest.raises(UserInputError, match="valid names include"):
        parse_layer(model, "featurez.3")


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_model_analyses_through_the_default_layer(arch):
    torch.manual_seed(0)
    model = create_model(arch, 5, 1, 28).eval()
    ref = parse_layer(model, None)
    x = torch.randn(2, 1, 28, 28)
    eff = compute_neuron_effects(model, ref, {0: x}, AttributionConfig(num_samples=2))
    assert eff.matrices.shape[2] == 5
    assert eff.method == "affine"
    assert torch.isfinite(eff.matrices).all()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training


class PoolConvHead(nn.Module):
    """conv -> [layer] -> maxpool -> conv -> bn -> relu -> gap -> linear; the chain after the
    layer (maxpool, conv, bn) folds, the ReLU does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()

    def forward(self, x):
        return self.fc(self.flat(self.gap(self.act(self.bn(self.conv2(self.pool(self.conv1(x))))))))


def _manual_attribution(head, h, delta=1.0):
    """A[i, k] by the definition, one neuron at a time, with ``head`` applied to activations."""
    base = head(h.clone())
    rows = []
    for i in range(h.shape[1]):
        hh = h.clone()
        hh[:, i] += delta
        rows.append((head(hh) - base).abs().mean(0))
    return torch.stack(rows)


def test_fold_through_maxpool_conv_bn_is_exact():
    torch.manual_seed(0)
    model = PoolConvHead().eval()
    x = torch.randn(9, 1, 8, 8)
    eff = compute_neuron_effects(model, LayerRef("conv1"), {0: x}, AttributionConfig(chunk_size=10))
    assert eff.folded == "pool -> conv2 -> bn"
    # ReLU then only affine modules (gap, flatten, fc): one max pass per row (the plan's relu_offset).
    assert eff.method == "batched-folded-chain-relu"
    h = model.conv1(x)
    expected = _manual_attribution(lambda t: model.fc(model.flat(model.gap(model.act(model.bn(model.conv2(
        model.pool(t))))))), h)
    assert torch.allclose(eff.matrices[0], expected, atol=1e-5)
    unfolded = compute_neuron_effects(model, LayerRef("conv1"), {0: x}, AttributionConfig(exact_affine=False))
    assert unfolded.folded == "" and torch.allclose(unfolded.matrices[0], expected, atol=1e-5)


def test_relu_shortcut_not_taken_when_the_rest_is_not_affine():
    # A global max-pool after the ReLU is not affine: rows go through the modules as they are.
    torch.manual_seed(1)
    model = PoolConvHead().eval()
    model.gap = nn.AdaptiveMaxPool2d(1)
    x = torch.randn(7, 1, 8, 8)
    eff = compute_neuron_effects(model, LayerRef("conv1"), {0: x}, AttributionConfig(chunk_size=10))
    assert eff.folded == "pool -> conv2 -> bn" and eff.method == "batched-folded-chain"
    expected = naive_class_attribution(model, LayerRef("conv1"), x)
    assert torch.allclose(eff.matrices[0], expected, atol=1e-5)


def test_fold_stops_where_the_shift_is_no_longer_channel_constant():
    # After conv2 the shift varies at the image border, so a max-pool may not pass it on.
    class ConvThenPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
            self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.pool(self.conv2(self.conv1(x))).flatten(1))

    torch.manual_seed(0)
    model = ConvThenPool().eval()
    x = torch.randn(5, 1, 8, 8)
    eff = compute_neuron_effects(model, LayerRef("conv1"), {0: x}, AttributionConfig())
    assert eff.folded == "conv2"
    assert torch.allclose(eff.matrices[0], naive_class_attribution(model, LayerRef("conv1"), x), atol=1e-5)


def test_fold_is_refused_when_the_layer_also_reaches_the_output_another_way():
    class HiddenSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.relu(self.b(h)) + torch.tanh(h))  # h also feeds a functional op

    torch.manual_seed(0)
    model = HiddenSkip().eval()
    x = torch.randn(6, 4)
    eff = compute_neuron_effects(model, LayerRef("a"), {0: x}, AttributionConfig())
    assert eff.folded == ""
    assert torch.allclose(eff.matrices[0], naive_class_attribution(model, LayerRef("a"), x), atol=1e-5)


def test_layer_followed_by_inplace_relu_uses_the_pre_relu_activation():
    # features.5 is a batch norm whose output an in-place ReLU overwrites; the analysis must
    # intervene on the batch-norm output itself.
    torch.manual_seed(3)
    model = create_model("cnn", 10, 1, 28).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.bias.normal_()
    x = torch.randn(6, 1, 28, 28)
    h = model.features[:6](x)
    expected = _manual_attribution(lambda t: model.fc(model.features[6:](t)), h)
    eff = compute_neuron_effects(model, LayerRef("features.5"), {0: x}, AttributionConfig(chunk_size=50))
    assert torch.allclose(eff.matrices[0], expected, atol=1e-5)
    assert torch.allclose(naive_class_attribution(model, LayerRef("features.5"), x), expected, atol=1e-5)


@pytest.mark.parametrize("layer,folded", [("features.6", "features.7 -> features.8 -> features.9"),
                                          ("features.2", "features.3 -> features.4 -> features.5"),
                                          ("features.10", "features.11 -> features.12 -> fc")])
def test_folded_cnn_layers_match_the_naive_loop(layer, folded):
    torch.manual_seed(2)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(8, 1, 28, 28)
    ref = parse_layer(model, layer)
    eff = compute_neuron_effects(model, ref, {0: x}, AttributionConfig(chunk_size=64))
    assert eff.folded == folded
    assert torch.allclose(eff.matrices[0], naive_class_attribution(model, ref, x), atol=1e-5)


def test_branching_network_uses_the_stub_and_matches_the_naive_loop():
    # After resnet18's layer3 the activation feeds both a conv and the shortcut: nothing folds,
    # no module chain to replay, so the rest of the network runs on a stub input.
    torch.manual_seed(4)
    model = create_model("resnet18", 10, 1, 16).eval()
    x = torch.randn(3, 1, 16, 16)
    ref = parse_layer(model, "layer3")
    a, kind = class_attribution(model, ref, x, AttributionConfig(chunk_size=200))
    assert kind == "stub"
    assert torch.allclose(a, naive_class_attribution(model, ref, x), atol=1e-4)


def test_cpu_channels_last_restores_weights_and_keeps_updates():
    from soda_backdoor.utils import cpu_channels_last

    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(3, 1, 28, 28)
    before = model(x)
    originals = [p.data for p in model.parameters()]
    expected = model.features[4].weight.detach() + 1.0
    with cpu_channels_last(model):
        assert model.features[0].weight.stride()[1] == 1  # channels-last, even with one input channel
        assert torch.allclose(model(x), before, atol=1e-5)
        with torch.no_grad():
            model.features[4].weight.add_(1.0)
    assert all(p.data_ptr() == d.data_ptr() for p, d in zip(model.parameters(), originals))
    assert model.features[4].weight.is_contiguous()
    assert torch.equal(model.features[4].weight, expected)


@pytest.mark.parametrize("arch", ["cnn", "MobileNetV2", "shufflenetv2"])
def test_inference_view_folds_batch_norm_and_leaves_the_model(arch):
    from soda_backdoor.analysis.hooks import intervene, layer_names
    from soda_backdoor.utils import inference_view

    torch.manual_seed(0)
    model = create_model(arch, 10, 1, 28).train()
    for m in model.modules():  # batch norms with statistics of their own, so folding changes weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), inference_view(model) as fast:
        assert not fast.training
        folded = not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
        assert folded == (arch != "shufflenetv2")  # shufflenetv2 cannot be traced: it runs as it is
        assert torch.allclose(fast(x), expected, atol=1e-4)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # a model with an intervention hooked in runs as it is, so the intervention applies
    ref = parse_layer(model, layer_names(model)[0])
    with torch.no_grad(), intervene(model, ref, lambda h: h * 0), inference_view(model) as fast:
        assert fast is model
