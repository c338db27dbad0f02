"""Outstanding-neuron masks and the masked fine-tuning loop on a tiny model."""

import pytest
import torch
from torch import nn

from soda_backdoor.analysis import LayerRef
from soda_backdoor.errors import UserInputError
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


def test_repair_changes_the_decision_on_reconstructed_samples():
    """A planted backdoor (a bright corner sends class 0 to class 2) is removed; clean accuracy survives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(192, 1, 4, 4)
    y = (x[:, 0, 0, 0] > 0).long()  # the clean task: classes 0 and 1
    x[y == 1, 0, 1:3, 1:3] += 1.0
    trigger = torch.zeros(1, 1, 4, 4)
    trigger[..., 3, 3] = 4.0
    poisoned = x[y == 0][:48] + trigger
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):  # plant the backdoor
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.cat([x, poisoned])),
                                           torch.cat([y, torch.full((48,), 2)]))
        loss.backward()
        opt.step()
    model.eval()
    recon = x[y == 0][48:72] + trigger  # infected samples of the source class
    with torch.no_grad():
        before = (model(recon).argmax(1) == 2).float().mean().item()
    assert before >= 0.9
    repair_model(model, LayerRef("3", "input"), torch.rand(16), x, y, recon, source=0, target=2,
                 config=RepairConfig(top=1.0, epochs=5, lr=0.01, reg=1.0, batch_size=32, num_recon=8))
    with torch.no_grad():
        after = (model(recon).argmax(1) == 2).float().mean().item()
        clean_acc = (model(x).argmax(1) == y).float().mean().item()
    assert after <= 0.2
    assert clean_acc >= 0.9


class _DarkToTarget(nn.Module):
    """Class 2 for a dark image (mean pixel < 0.3 in [0, 1]), else class 0: a 'dark source' backdoor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (x.flatten(1).mean(1) < 0.3).float()
        return torch.stack([1 - dark, torch.zeros_like(dark), dark], 1)


def test_natural_variation_is_seeded_and_keeps_shape_and_range() -> None:
    from soda_backdoor.data.augment import natural_variation

    x = torch.rand(40, 1, 28, 28)
    a = natural_variation(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    assert torch.equal(a, natural_variation(x, torch.Generator().manual_seed(3)))


def test_mine_variations_keeps_only_the_varied_sources_sent_to_the_target() -> None:
    from soda_backdoor.repair import mine_variations

    model = _DarkToTarget()
    x = torch.full((60, 1, 28, 28), 0.45)  # clean sources: none is dark enough for the backdoor
    assert (model(x).argmax(1) == 0).all()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    mined = mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen())
    assert 0 < len(mined) < 300 and (model(mined).argmax(1) == 2).all()  # darkened copies only
    assert len(mine_variations(model, x, 2, copies=5, cap=7, normalize=lambda v: v, gen=gen())) == 7
    assert len(mine_variations(model, x, 2, copies=0, cap=200, normalize=lambda v: v, gen=gen())) == 0
    assert len(mine_variations(model, x, 1, copies=5, cap=200, normalize=lambda v: v, gen=gen())) == 0
    # with a confidence, only those the target takes with that softmax probability (here 0.58)
    assert len(mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen(),
                               confidence=0.5)) == len(mined)
    assert len(mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen(),
                               confidence=0.95)) == 0
    # with an anchor, only copies of originals the model gives the source with that probability (0.58)
    assert len(mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen(),
                               source=0, anchor=0.5)) == len(mined)
    assert len(mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen(),
                               source=0, anchor=0.95)) == 0


def test_second_generation_of_variations_reaches_further_than_one() -> None:
    from soda_backdoor.repair import mine_variations

    model = _DarkToTarget()
    x = torch.full((60, 1, 28, 28), 0.45)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    one = mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen())
    two = mine_variations(model, x, 2, copies=5, cap=1000, normalize=lambda v: v, gen=gen(), generations=2)
    assert (model(two).argmax(1) == 2).all()
    assert len(two) > len(one) // 2  # each generation gets half the cap; the second has hits of its own
    assert two[len(one) // 2:].mean() < one.mean()  # variations of the hits are darker still


def test_cut_target_links_cuts_the_neuron_that_carries_infected_samples_and_holds_it() -> None:
    from soda_backdoor.repair.repair import cut_target_links

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
    x_src = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    x_inf = x_src.clone()
    x_inf[:, 3] = 5.0  # neuron 3 carries the infected samples to the target (class 2)
    cut, hold = cut_target_links(net, x_inf, x_src, source=0, target=2, share=0.5)
    assert cut.tolist() == [3] and net[0].weight[2, 3] == 0 and net[0].weight[2, 2] == 1
    net(x_inf).sum().backward()
    assert net[0].weight.grad[2, 3] == 0 and net[0].weight.grad[2, 0] != 0
    hold.remove()


def test_feature_reconstructions_reach_the_target_near_their_start_and_keep_the_sign() -> None:
    from soda_backdoor.repair.repair import feature_reconstructions

    torch.manual_seed(0)
    tail = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():  # class 0 reads unit 0, class 2 reads unit 5 (the 'backdoor' unit)
        tail[0].weight.copy_(torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 3.0]]))
        tail[0].bias.zero_()
    h = torch.rand(20, 6) * 0.2
    h[:, 0] += 2.0  # clean sources, confidently class 0
    out = feature_reconstructions(tail, h, target=2, step=0.05, steps=200, threshold=0.9)
    assert len(out) == 20 and (out >= 0).all()
    p = tail(out).softmax(1)
    assert (p.argmax(1) == 2).all() and (p[:, 2] >= 0.9).all()
    moved = out - h
    assert (moved[:, 5] > 0).all() and (moved[:, 5].abs() >= moved[:, 1:5].abs().max(1).values).all()
    assert all(p.requires_grad for p in tail.parameters()) and tail.training
    assert all(p.grad is None for p in tail.parameters())
    assert len(feature_reconstructions(tail, h, target=2, step=1e-4, steps=3, threshold=0.9)) == 0


def test_repair_with_feature_samples_runs_at_a_cut_and_without_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 1, 4, 4)
    y = torch.randint(0, 3, (64,))
    recon = torch.randn(10, 1, 4, 4)
    for tune_from in ("2", None):
        res = repair_model(model, LayerRef("5", "input"), torch.rand(8), x, y, recon, source=0, target=2,
                           config=RepairConfig(epochs=1, batch_size=16, num_recon=4, tune_from=tune_from,
                                               feature_samples=10, feature_threshold=0.0,
                                               variation_anchor=0.0))
        assert len(res.history) == 1 and not model.training
        assert (res.num_feature > 0) == (tune_from is not None)
    no_source = torch.randint(1, 3, (64,))  # the defender holds no clean sample of the source
    res = repair_model(model, LayerRef("5", "input"), torch.rand(8), x, no_source, recon, source=0, target=2,
                       config=RepairConfig(epochs=1, batch_size=16, num_recon=4, tune_from="2", feature_samples=10))
    assert res.num_feature == 0 and len(res.history) == 1


def test_bfloat16_repair_tunes_in_low_precision_and_keeps_float32_weights() -> None:
    def tuned(precision: str) -> tuple[nn.Module, list]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
                              nn.Linear(8, 3))
        x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
        res = repair_model(model, LayerRef("5", "input"), torch.rand(8), x, y, torch.randn(10, 1, 4, 4), source=0,
                           target=2, config=RepairConfig(epochs=2, batch_size=16, num_recon=4, tune_from=None,
                                                         variation_anchor=0.0, precision=precision, lr=0.05))
        return model, res.history

    full, full_hist = tuned("float32")
    low, low_hist = tuned("bfloat16")
    assert all(p.dtype == torch.float32 for p in low.parameters())
    # the same steps, rounded differently: close to the float32 run, not equal to it
    for a, b in zip(full.parameters(), low.parameters()):
        assert torch.allclose(a, b, atol=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), low.parameters()))
    assert abs(full_hist[-1]["loss"] - low_hist[-1]["loss"]) < 0.1


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_tunes_in_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native: bool) -> None:
    from soda_backdoor.repair.repair import tuning_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert tuning_precision("auto", cpu) == ("bfloat16" if native else "float32")
    assert tuning_precision("float32", cpu) == "float32" and tuning_precision("bfloat16", cpu) == "bfloat16"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    res = repair_model(model, LayerRef("3", "input"), torch.rand(8), x, y, torch.randn(6, 1, 4, 4), source=0, target=2,
                       config=RepairConfig(epochs=1, batch_size=16, num_recon=4, tune_from=None, variation_anchor=0.0))
    assert res.config.precision == ("bfloat16" if native else "float32")  # the result names what ran


def test_repair_precision_is_checked() -> None:
    from soda_backdoor.cli.main import REPAIR_PRECISIONS
    from soda_backdoor.repair.repair import PRECISIONS

    assert REPAIR_PRECISIONS == PRECISIONS
    with pytest.raises(UserInputError, match="precision"):
        RepairConfig(precision="float16")
