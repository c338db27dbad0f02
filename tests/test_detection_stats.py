"""Pure statistics and target scores on constructed attribution matrices."""

import math

import torch

from soda_backdoor.analysis import NeuronEffects
from soda_backdoor.detection import MAD_SCALE, mad_outliers, pearson, source_scores, target_scores


def test_pearson_basic():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert math.isclose(pearson(a, 2 * a + 1), 1.0, abs_tol=1e-9)
    assert math.isclose(pearson(a, -a), -1.0, abs_tol=1e-9)
    assert pearson(a, torch.ones(3)) == 0.0


def test_mad_outliers_hand_computed():
    scores = torch.tensor([1.0, 1.2, 0.8, 1.05, 1.3, 1.1, 0.9, 0.95, 0.85, 10.0])
    res = mad_outliers(scores, threshold=3.0)
    norm = scores / 10.0
    med = norm.median()
    mad = MAD_SCALE * (norm - med).abs().median()
    assert math.isclose(res.median, float(med), rel_tol=1e-6)
    assert math.isclose(res.mad, float(mad), rel_tol=1e-6)
    assert res.flagged[0] == 9
    assert res.flagged == (9,)
    assert math.isclose(res.anomaly_index[9], float((norm[9] - med) / mad), rel_tol=1e-6)


def test_mad_outliers_nothing_flagged_on_uniform_scores():
    res = mad_outliers(torch.tensor([0.5, 0.52, 0.49, 0.51, 0.5, 0.48]), threshold=3.0)
    assert res.flagged == ()


def test_target_score_flags_planted_backdoor_neurons():
    # Ten classes, 32 neurons. Every class column draws on the same neurons, except the target (3),
    # which depends on a few dedicated neurons: its column decorrelates from the mean of the others.
    g = torch.Generator().manual_seed(0)
    base = torch.rand(32, generator=g)
    cols = [base + 0.05 * torch.rand(32, generator=g) for _ in range(10)]
    cols[3] = torch.rand(32, generator=g) * 0.1
    cols[3][:3] = 5.0
    a = torch.stack(cols, 1)
    eff = NeuronEffects("x", torch.stack([a] * 10), tuple(range(10)), (1,) * 10, "affine")
    s = target_scores(eff, 10)
    assert int(s.argmax()) == 3
    assert mad_outliers(s, 3.0).flagged == (3,)


def test_source_rules():
    e = torch.zeros(4, 4, dtype=torch.double)
    e[1, 2], e[2, 1] = 5.0, 5.0  # natural, symmetric similarity between 1 and 2
    e[0, 2], e[2, 0] = 4.0, -1.0  # one-way push 0 -> 2
    mean, _, _ = source_scores(e, 2, "mean_logit")
    asym, _, _ = source_scores(e, 2, "asymmetry")
    assert int(mean.argmax()) == 1
    assert int(asym.argmax()) == 0


def test_transfer_steps_ranks_closer_class_first():
    from torch import nn

    from soda_backdoor.detection import transfer_steps

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]]))
        model[1].bias.zero_()
    near = torch.tensor([[1.0, 0.0, 0.8, 0.0]]).repeat(4, 1).view(4, 1, 2, 2)  # class 0, almost class 2
    far = torch.tensor([[0.0, 2.0, 0.0, 0.0]]).repeat(4, 1).view(4, 1, 2, 2)  # class 1, far from class 2
    steps = transfer_steps(model, [(near, 2), (far, 2)], steps=200)
    assert 0 < steps[0] < steps[1] < 200
    assert all(p.requires_grad for p in model.parameters())


def test_transfer_steps_only_fastest_keeps_the_fastest_group_exactly():
    """Giving up on groups that cannot be the fastest changes neither the argmin nor its mean."""
    from torch import nn

    from soda_backdoor.detection import transfer_steps

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 4) * 3.0)
        model[1].bias.zero_()
    groups = [(torch.tensor([1.0, 0.0, a, 0.0]) + 0.1 * torch.randn(8, 4), 2) for a in (0.9, 0.3, -0.3, -0.9)]
    groups = [(x.view(8, 1, 2, 2), t) for x, t in groups]
    full = transfer_steps(model, groups, steps=200, lr=0.01)
    fast = transfer_steps(model, groups, steps=200, lr=0.01, only_fastest=True)
    assert int(full.argmin()) == int(fast.argmin()) == 0
    assert torch.allclose(fast[0], full[0]) and float(full[0]) < 200
    assert bool((fast >= full - 1e-9).all())  # the others are upper bounds
    assert bool((fast > full + 1).any())  # and some group was given up early
