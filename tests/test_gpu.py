"""The GPU path: refused clearly without CUDA; exercised (training, sampling, scoring) where CUDA exists."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.common import PipelineError, pick_device
from pipeline.data import Candidates
from pipeline.models import load_model
from pipeline.models.gmf import GMF
from pipeline.models.mlp import MLP
from pipeline.models.neumf import NeuMF
from pipeline.sampling import ComplementSampler
from pipeline.training import FitConfig, fit, fit_and_refit, seeded_generator

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="PyTorch sees no CUDA device on this machine")


def small_problem(seed: int = 0) -> tuple[sp.csr_matrix, Candidates]:
    rng = np.random.default_rng(seed)
    train = sp.random(40, 30, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    train.data[:] = 1
    dense = train.toarray() > 0
    rows = [[*rng.choice(np.flatnonzero(~dense[u]), 6, replace=False)] for u in range(40)]
    return train, Candidates(np.arange(40), np.array(rows))


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: the refusal applies only without it")
def test_cuda_without_cuda_is_refused_naming_the_param() -> None:
    with pytest.raises(PipelineError, match="'device' is 'cuda', but PyTorch sees no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


@needs_cuda
def test_a_gpu_stage_turns_on_torchs_determinism() -> None:
    """docs/scale.md: the same GPU model repeats a run's bytes (deterministic algorithms, no cuDNN
    autotuning, no TF32, cuBLAS's fixed workspace); and two fits on the GPU give the same weights."""
    import os

    assert pick_device("cuda") == torch.device("cuda")
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # set by pipeline/cpu.py before CUDA starts
    train, candidates = small_problem()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MLP.from_params(40, 30, {"layers": [8, 4], "dropout": 0.1})
        cfg = FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=2, batch_size=16, negatives=2, topK=5)
        state, _, _ = fit(model, train, candidates, cfg, torch.device("cuda"), "mlp")
        states.append(state)
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


@needs_cuda
def test_negatives_are_drawn_on_the_gpu_from_the_complement() -> None:
    train, _ = small_problem()
    device = torch.device("cuda")
    sampler = ComplementSampler(train, device)
    users = torch.arange(40, device=device).repeat_interleave(50)
    items = sampler.draw(users, 3, seeded_generator(0, 2, device))
    assert items.device.type == "cuda"
    dense = torch.as_tensor(train.toarray() > 0, device=device)
    assert not dense[users[:, None].expand_as(items), items].any()


@needs_cuda
def test_training_and_the_refit_run_on_the_gpu(tmp_path) -> None:
    train, val = small_problem()
    device = torch.device("cuda")
    cfg = FitConfig(seed=0, lr=0.01, weight_decay=0.0, epochs=3, batch_size=64, negatives=2, topK=3)

    def make(refit: bool) -> MLP:
        torch.manual_seed(0)
        return MLP(40, 30, [8, 4])

    refit_state, state, curve, best = fit_and_refit(make, train, train, val, cfg, device)  # the thread path
    assert len(curve) == 3 and 1 <= best <= 3
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in {**state, **refit_state}.values())
    path = tmp_path / "mlp.pt"
    torch.save(state, path)
    model = load_model("mlp", path, train, device)
    assert model.device.type == "cuda"
    cpu = load_model("mlp", path, train)
    torch.testing.assert_close(model.score_all(np.arange(40)), cpu.score_all(np.arange(40)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.score(val.users, val.items), cpu.score(val.users, val.items), rtol=1e-4, atol=1e-5)


@needs_cuda
def test_neumf_scores_every_item_on_the_gpu_as_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = NeuMF.from_pretrained(GMF(40, 30, 4), MLP(40, 30, [8, 4])).eval()
    expected = model.score_all(np.arange(40))
    got = model.to("cuda").score_all(np.arange(40))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    state, _, _ = fit(model, small_problem()[0], None, FitConfig(0, 0.01, 0.0, 1, 64, 2, 3), torch.device("cuda"))
    assert all(torch.isfinite(v).all() for v in state.values())
