"""Outstanding-neuron masks and the masked fine-tuning loop on a tiny model."""

import torch
from torch import nn

from soda_backdoor.analysis import LayerRef
from soda_backdoor.repair import RepairConfig, outstanding_neurons, repair_model


def test_outstanding_neurons_keeps_top_fraction():
    a = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert outstanding_neurons(a, 0.5).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert outstanding_neurons(a, 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_repair_loop_runs_with_mask_and_leaves_no_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 1, 4, 4)
    y = torch.randint(0, 3, (64,))
    recon = torch.randn(10, 1, 4, 4)
    res = repair_model(model, LayerRef("3", "input"), torch.rand(8), x, y, recon, source=0, target=2,
                       config=RepairConfig(top=0.5, epochs=2, batch_size=16, num_recon=4))
    assert res.num_kept == 4 and res.num_neurons == 8
    assert len(res.history) == 2
    assert not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
