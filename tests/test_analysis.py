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
    assert kind in ("stub", "tiled")
    assert torch.allclose(a, model.fc2.weight.abs().t() / 2)


def test_fast_path_equals_general_path_on_cnn():
    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(16, 1, 28, 28)
    ref = parse_layer(model, None)
    fast, kind = class_attribution(model, ref, x, AttributionConfig())
    slow, kind2 = class_attribution(model, ref, x, AttributionConfig(exact_affine=False, chunk_size=100))
    assert kind == "affine" and kind2 == "affine"
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_batched_equals_naive_at_inner_layer(chunk):
    torch.manual_seed(1)
    model = create_model("cnn", 10, 1, 28).eval()
    x = torch.randn(10, 1, 28, 28)
    ref = LayerRef("features.5")  # ReLU after the second conv block: the rest is not affine
    batched, kind = class_attribution(model, ref, x, AttributionConfig(chunk_size=chunk))
    naive = naive_class_attribution(model, ref, x)
    assert kind == "stub"
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
    assert eff.matrices.shape == (2, 64, 10)
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
