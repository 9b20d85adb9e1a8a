"""The baseline model and optimizer of training_template/train.py, loaded without running the script
(tests/template_defs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TEMPLATE = Path(__file__).resolve().parents[2] / "training_template"
sys.path.insert(0, str(TEMPLATE))

import prepare  # noqa: E402

from tests.template_defs import load_train_defs, run_muon  # noqa: E402


@pytest.fixture(scope="module")
def train_defs() -> dict:
    return load_train_defs()


def test_polar_express_orthogonalises(train_defs):
    torch.manual_seed(0)
    # Gaussian matrices: rectangular ones keep their singular values away from 0, and 5 Polar Express
    # iterations bring all of them into about [0.86, 1.14]; a square one has a few near 0 that stay small.
    for shape, dtype in (((2, 32, 96), torch.float32), ((2, 96, 32), torch.float32),
                         ((2, 32, 96), torch.bfloat16), ((1, 128, 512), torch.float32)):
        s = torch.linalg.svdvals(train_defs["orthogonalize"](torch.randn(*shape), dtype).float())
        assert s.min() > 0.8 and s.max() < 1.2, (shape, dtype, s.min(), s.max())
    s = torch.linalg.svdvals(train_defs["orthogonalize"](torch.randn(2, 64, 64), torch.float32))
    assert (s > 0.7).float().mean() > 0.95 and s.max() < 1.2


def test_model_is_causal_and_shapes_are_right(train_defs):
    torch.manual_seed(0)
    GPT = train_defs["GPT"]
    model = GPT(vocab_size=257, depth=2, dim=64, n_head=4, head_dim=16, seq_len=32)
    model.init_weights()
    with torch.no_grad():  # break the zero init so every path carries signal
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.attn.ve_gate.weight, std=0.1) if block.attn.ve_gate is not None else None
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    idx = torch.randint(0, 257, (4, 32))
    logits = model(idx)
    assert logits.shape == (4, 32, 257) and logits.abs().max() <= 15
    idx2 = idx.clone()
    idx2[:, 20:] = (idx2[:, 20:] + 1) % 257
    logits2 = model(idx2)
    assert torch.allclose(logits[:, :20], logits2[:, :20], atol=1e-5)
    assert not torch.allclose(logits[:, 20:], logits2[:, 20:], atol=1e-3)
    with torch.no_grad():
        loss = model(idx[:, :-1], idx[:, 1:])
        reference = torch.nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, 257), idx[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    # the harness's causality probe accepts it
    rows = torch.randint(0, 257, (4, 33)).numpy()
    kept = rows.copy()
    assert train_defs["prepare"].check_causal.__module__ == "prepare"
    prepare.check_causal(model, rows, torch.device("cpu"), tol=1e-5)
    assert (rows == kept).all(), "the causality probe must not perturb the caller's rows (it once did)"


def test_sliding_window_masks_far_tokens(train_defs):
    attend = train_defs["attend"]
    q = torch.randn(1, 1, 16, 8)
    k = torch.randn(1, 1, 16, 8)
    v = torch.zeros(1, 1, 16, 8)
    v[:, :, 0] = 1.0  # only the first position carries a value
    out = attend(q, k, v, 4)
    assert out[0, 0, :4, 0].gt(0).all() and out[0, 0, 4:].abs().max() == 0  # beyond the window: unseen


def test_reference_sized_model_matches_the_baseline(train_defs, monkeypatch):
    # The h100 baseline: depth 8, dim 512, 4 heads of 128, vocab 8192, "SSSL" windows: about 50.3 M params and
    # the reference's FLOPs per token (6 x non-embedding params + attention over the effective windows).
    monkeypatch.setitem(train_defs, "WINDOW_PATTERN", "SSSL")  # the h100 values of pick()
    monkeypatch.setitem(train_defs, "VE_GATE_CHANNELS", 32)
    model = train_defs["GPT"](8192, 8, 512, 4, 128, 2048)
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e6 == pytest.approx(50.3, abs=0.1)
    assert model.windows == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    assert sum(model.has_ve) == 4 and model.has_ve[-1]
    assert model.estimate_flops() / 1e6 == pytest.approx(239.3, abs=1.0)


def test_muon_step_updates_matrices(train_defs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    w.grad = torch.randn(16, 8)
    before = w.detach().clone()
    muon = train_defs["Muon"]([w], lr=0.02, momentum=0.95, weight_decay=0.1, beta2=0.95, ortho_dtype=torch.float32)
    muon.step()
    step = (w.detach() - before).norm()
    assert 0 < step < 1.0 and torch.isfinite(w).all()


@pytest.mark.filterwarnings("ignore")  # eager FlexAttention warns that it is unfused; exact all the same
def test_flex_attention_masks_match_sdpa(train_defs, monkeypatch):
    # The CUDA path (FlexAttention block masks) and the CPU path (dense masks) must agree on every window.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 16) for _ in range(3))
    expected = {w: train_defs["attend"](q, k, v, w) for w in (64, 128)}
    monkeypatch.setitem(train_defs, "ATTENTION", {"impl": "sdpa", "block_masks": {}})
    train_defs["configure_attention"]("flex", 128, [64, 128], "cpu")
    for w in (64, 128):
        assert torch.allclose(train_defs["attend"](q, k, v, w), expected[w], atol=1e-5)
    # mixed: FlexAttention only where a window is shorter than the sequence, SDPA's causal kernel elsewhere
    monkeypatch.setitem(train_defs, "ATTENTION", {"impl": "sdpa", "block_masks": {}})
    train_defs["configure_attention"]("mixed", 128, [64, 128, 64], "cpu")
    assert set(train_defs["ATTENTION"]["block_masks"]) == {(128, 64)}
    for w in (64, 128):
        assert torch.allclose(train_defs["attend"](q, k, v, w), expected[w], atol=1e-5)


def _muon_run(train_defs, steps: int, **kwargs) -> list[torch.Tensor]:
    """Two groups (16x8 twice, 8x16 once), a schedule that changes lr and momentum every step, fixed grads."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((16, 8), (16, 8), (8, 16))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    run_muon(train_defs, params, grads, lr=0.02, weight_decay=0.1, ortho_dtype=torch.float32, **kwargs)
    return [p.detach().clone() for p in params]


def test_compiled_muon_update_matches_eager_and_never_recompiles(train_defs):
    # COMPILE_OPTIMIZER on CUDA: the same update through torch.compile (fullgraph, so a graph break fails
    # here), with the schedule's scalars as 0-d tensors. Tolerance: float32 throughout, and Inductor's fused
    # reductions (the norms) sum in another order, so results agree to float32 rounding, not bit for bit.
    eager = _muon_run(train_defs, 4)
    torch._dynamo.reset()
    compiled = _muon_run(train_defs, 1, compile=True)  # compiles each shape once
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_muon_run(train_defs, 1), compiled, strict=True))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = _muon_run(train_defs, 4, compile=True)  # lr and momentum change every step
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_muon_goes_on_eagerly_when_compiling_fails(train_defs, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    def fake_compile(fn, **kwargs):
        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    fallback = _muon_run(train_defs, 3, compile=True)
    assert capsys.readouterr().out.count("Muon: torch.compile failed (RuntimeError: no compiler here)") == 1
    assert all(torch.equal(a, b) for a, b in zip(_muon_run(train_defs, 3), fallback, strict=True))
