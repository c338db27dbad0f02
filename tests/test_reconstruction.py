"""Batched reconstruction equals the one-at-a-time procedure."""

from dataclasses import replace

import torch
from torch import nn

from soda_backdoor.reconstruction import ReconstructionConfig, reconstruct_inputs, reconstruct_one_by_one


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[5].weight.mul_(10)  # logits large enough for the threshold to be reached
    return model


def test_batched_matches_one_by_one():
    model = _tiny_model()
    torch.manual_seed(1)
    starts = torch.randn(12, 1, 6, 6)
    cfg = ReconstructionConfig(steps=40, lr=0.1, reg=0.1, threshold=0.95, num_keep=12, batch_size=12,
                               stop_when_kept=False)
    rec = reconstruct_inputs(model, starts, torch.arange(12), source=0, target=2, config=cfg)
    xs, steps, kept = reconstruct_one_by_one(model, starts, 2, cfg)
    kept_idx = [i for i, k in enumerate(kept) if k]
    assert rec.kept == len(kept_idx) and rec.kept > 0
    assert rec.start_indices.tolist() == kept_idx
    assert rec.steps.tolist() == [steps[i] for i in kept_idx]
    ref = torch.stack([xs[i] for i in kept_idx])
    assert torch.allclose(rec.samples, ref, atol=1e-4)
    # early stopping: some samples stopped before the step budget, and they stopped changing
    assert min(steps) < cfg.steps and max(steps) > min(steps)
    # every kept sample is sent to the target, and target_prob is the model's own probability for it
    with torch.no_grad():
        probs = torch.softmax(model(rec.samples), 1)
    assert (probs.argmax(1) == 2).all()
    assert torch.allclose(probs[:, 2], rec.target_prob, atol=1e-4)


def test_stop_when_kept_stops_the_slow_starts():
    """With enough starts past the threshold, the others stop; the kept ones are those of the full run."""
    model = _tiny_model()
    torch.manual_seed(1)
    starts = torch.randn(12, 1, 6, 6)
    full_cfg = ReconstructionConfig(steps=40, lr=0.1, reg=0.1, threshold=0.95, num_keep=3, batch_size=12,
                                    stop_when_kept=False)
    full = reconstruct_inputs(model, starts, torch.arange(12), 0, 2, full_cfg)
    cut = reconstruct_inputs(model, starts, torch.arange(12), 0, 2, replace(full_cfg, stop_when_kept=True))
    assert cut.kept == full.kept == 3
    fast = set(full.start_indices[full.steps < full.steps.max()].tolist())
    assert set(cut.start_indices.tolist()) >= fast and int(cut.steps.max()) <= int(full.steps.max())


def test_keeps_at_most_num_keep_in_start_order():
    model = _tiny_model()
    starts = torch.randn(20, 1, 6, 6)
    cfg = ReconstructionConfig(steps=80, threshold=0.8, num_keep=3, batch_size=8)
    rec = reconstruct_inputs(model, starts, torch.arange(100, 120), 0, 1, cfg)
    assert rec.kept <= 3
    assert rec.start_indices.tolist() == sorted(rec.start_indices.tolist())
    assert all(100 <= i < 120 for i in rec.start_indices.tolist())
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_max_tries_bounds_the_starts_tried():
    """More samples wanted than reach the target: without a bound every start is tried, with one
    at most ``max_tries``, the kept ones those of the unbounded run among them."""
    model = _tiny_model()
    torch.manual_seed(2)
    starts = torch.randn(30, 1, 6, 6)
    cfg = ReconstructionConfig(steps=20, lr=0.1, reg=0.1, threshold=0.95, num_keep=30, batch_size=8)
    every = reconstruct_inputs(model, starts, torch.arange(30), 0, 2, cfg)
    assert every.tried == 30
    bounded = reconstruct_inputs(model, starts, torch.arange(30), 0, 2, replace(cfg, max_tries=10))
    assert bounded.tried == 10 and set(bounded.start_indices.tolist()) <= set(range(10))
    assert bounded.start_indices.tolist() == [i for i in every.start_indices.tolist() if i < 10]
    import pytest

    from soda_backdoor.errors import UserInputError

    with pytest.raises(UserInputError, match="max_tries"):
        ReconstructionConfig(max_tries=0)


def test_recon_max_tries_reaches_the_config():
    from soda_backdoor.cli.main import _recon_config, build_parser

    for argv, want in ((["reconstruct", "--model", "m", "--dataset", "fmnist", "--source", "0", "--target", "2",
                         "--out", "x.npz"], None),
                       (["run", "--recon-max-tries", "500"], 500)):
        assert _recon_config(build_parser().parse_args(argv)).max_tries == want
