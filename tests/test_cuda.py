"""The CUDA path, where a CUDA device exists (skipped elsewhere; CI has none).

The same steps on the same tiny data on the CPU and on CUDA: training runs on each, then
one CPU-trained model is evaluated, analysed, reconstructed and repaired on both devices,
and the results must agree (up to float differences between the devices).
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_workflow import tiny  # noqa: F401  (module fixture: tiny data and a user's attack file)
from soda_backdoor.analysis import AttributionConfig
from soda_backdoor.artifacts import SampleSet
from soda_backdoor.detection import DetectionConfig
from soda_backdoor.models import LoadedModel
from soda_backdoor.reconstruction import ReconstructionConfig
from soda_backdoor.repair import RepairConfig
from soda_backdoor.training import TrainConfig
from soda_backdoor.workflow import detect, evaluate, load_context, reconstruct, repair, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on(model: LoadedModel, device: str) -> LoadedModel:
    return LoadedModel(copy.deepcopy(model.module).to(device), model.meta)


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_steps_agree_on_cpu_and_cuda(tiny, arch) -> None:  # noqa: F811
    folder, attack = tiny
    ctx = load_context("fmnist", str(folder), None, str(attack))
    cfg = TrainConfig(epochs=2, batch_size=32, milestones=(1,))
    on_gpu = train(ctx, cfg, "cuda", arch)
    assert next(on_gpu.model.module.parameters()).is_cuda and 0.0 <= on_gpu.evaluation.acc <= 1.0
    model = train(ctx, cfg, "cpu", arch).model
    cpu, gpu = _on(model, "cpu"), _on(model, "cuda")
    ev_c, ev_g = evaluate(cpu, ctx, "cpu"), evaluate(gpu, ctx, "cuda")
    assert abs(ev_c.acc - ev_g.acc) <= 0.02 and abs(ev_c.asr - ev_g.asr) <= 0.25
    dcfg = DetectionConfig(tau_target=0.0, attribution=AttributionConfig(num_samples=8))
    det_c, det_g = detect(cpu, ctx, dcfg, device="cpu"), detect(gpu, ctx, dcfg, device="cuda")
    assert torch.allclose(torch.tensor(det_c.result.target_scores), torch.tensor(det_g.result.target_scores),
                          atol=1e-3)
    assert [t for _, t in det_c.pairs] == [t for _, t in det_g.pairs]
    rcfg = ReconstructionConfig(steps=30, num_keep=6, batch_size=8)
    rec_c = reconstruct(cpu, ctx, 0, 2, rcfg, device="cpu")
    rec_g = reconstruct(gpu, ctx, 0, 2, rcfg, device="cuda")
    assert abs(rec_c.reconstruction.kept - rec_g.reconstruction.kept) <= 1
    if rec_g.reconstruction.kept >= 2:
        fixed = repair(gpu, ctx, 0, 2, SampleSet.from_reconstruction(rec_g.reconstruction, rec_g.fingerprint),
                       RepairConfig(epochs=1), device="cuda")
        assert next(fixed.model.module.parameters()).is_cuda and 0.0 <= fixed.after.acc <= 1.0
