"""train.py's compiled Muon update on CUDA (COMPILE_OPTIMIZER), at the baseline's matrix shapes: it compiles
(no silent eager fallback), never recompiles as the schedule moves, and steps where the eager update steps.
Skipped without CUDA."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tests.template_defs import load_train_defs, run_muon  # noqa: E402

pytestmark = pytest.mark.gpu
# the baseline's Muon groups: c_q/c_k/c_v/c_proj of 8 blocks, c_fc, mlp c_proj, ve_gate of 4 blocks
SHAPES = [(512, 512)] * 32 + [(2048, 512)] * 8 + [(512, 2048)] * 8 + [(4, 32)] * 4


def _run(defs, steps: int, compile: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator("cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, device="cuda", generator=gen) * 0.02) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(*s, device="cuda", generator=gen) for s in SHAPES] for _ in range(steps)]
    run_muon(defs, params, grads, lr=0.04, weight_decay=0.2, ortho_dtype=torch.bfloat16, compile=compile)
    torch.cuda.synchronize()
    return start, [p.detach() for p in params]


def test_compiled_muon_matches_eager_on_cuda(capsys):
    defs = load_train_defs()
    torch._dynamo.reset()
    start, eager = _run(defs, 4, compile=False)
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        _, compiled = _run(defs, 4, compile=True)
    assert "torch.compile failed" not in capsys.readouterr().out
    # bf16 orthogonalisation: Inductor keeps some intermediates in float32 where eager rounds them, so the
    # steps agree in direction (cosine) and size, not bit for bit; over 4 steps the small 4 x 32 gates drift
    # most (3 % in norm in a CPU stand-in run with bf16; the large matrices stay within 2 %)
    for s, a, b in zip(start, eager, compiled, strict=True):
        da, db = (a - s).flatten().double(), (b - s).flatten().double()
        cos = float(da @ db / (da.norm() * db.norm()))
        assert cos > 0.99 and abs(float(db.norm() / da.norm()) - 1) < 0.05, (tuple(s.shape), cos)


def test_causal_probe_spread_of_a_causal_model_on_cuda(capsys):
    """The harness's causal probe on CUDA, bf16 autocast, a compiled model at the baseline's width: a causal model
    must pass with room to spare (prints the measured spread: the figure CAUSAL_TOL['cuda'] should follow)."""
    defs = load_train_defs()
    prepare = defs["prepare"]
    torch.manual_seed(0)
    model = defs["GPT"](vocab_size=8192, depth=2, dim=512, n_head=4, head_dim=128, seq_len=2048).cuda()
    model.init_weights()
    with torch.no_grad():  # a trained-looking spread of logits, not the zero init's flat ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    defs["configure_attention"](defs["ATTN_IMPL"], 2048, model.windows, torch.device("cuda"))  # as train.py
    compiled = torch.compile(model, dynamic=False)
    rows = torch.randint(0, 8192, (8, 2049)).numpy()
    worst = max(prepare.check_causal(compiled, rows, torch.device("cuda"), vocab=8192) for _ in range(3))
    with capsys.disabled():
        print(f"\ncausal probe on CUDA: largest change before the cut {worst:.3g} nats "
              f"(tolerance {prepare.CAUSAL_TOL['cuda']})")
    assert worst <= prepare.CAUSAL_TOL["cuda"] / 2


@pytest.mark.parametrize("impl", ["flex", "mixed"])
def test_isolated_evaluation_on_cuda_matches_the_compiled_model(tmp_path, capsys, impl):
    """The isolated evaluation's path on CUDA: export the baseline-width model (FlexAttention, bf16 autocast), read
    it back with the harness's reader and run it eagerly; per-token nats must agree with the compiled model's under
    the evaluation's autocast, and the causal probe must pass on the exported graph. Prints the speed of both.
    "mixed" (SDPA for the full-context layers) must pass here before it can be train.py's default."""
    import time

    defs = load_train_defs()
    prepare = defs["prepare"]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = defs["GPT"](vocab_size=8192, depth=8, dim=512, n_head=4, head_dim=128, seq_len=2048).cuda()
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    defs["configure_attention"](impl, 2048, model.windows, dev)
    compiled = torch.compile(model, dynamic=False)
    rows = torch.randint(0, 8192, (32, 2049), device=dev)
    x, y = rows[:, :-1], rows[:, 1:]
    t0 = time.perf_counter()
    prepare.export_model(compiled, x, tmp_path / "model.json")
    t_export = time.perf_counter() - t0
    graph = prepare.ExportedModel(tmp_path / "model.json", dev)

    def timed(fn):
        with torch.no_grad():
            prepare._forward_logits(fn, x)  # warm (compiles the compiled one)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = prepare.token_nats(prepare._forward_logits(fn, x), y, 8192)
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    ref, t_compiled = timed(compiled)
    got, t_graph = timed(graph)
    spread = float((got - ref).abs().max())
    probe = prepare.check_causal(graph, rows.cpu().numpy(), dev, vocab=8192)
    with capsys.disabled():
        print(f"\nisolated evaluation on CUDA ({impl}): export {t_export:.1f}s; one 32 x 2048 batch {t_graph * 1e3:.0f} ms eager "
              f"graph vs {t_compiled * 1e3:.0f} ms compiled; largest per-token difference {spread:.3g} nats; causal "
              f"probe {probe:.3g} nats; peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    assert spread <= prepare.CAUSAL_TOL["cuda"] and float((got - ref).mean().abs()) < 1e-3
    assert graph._masks  # FlexAttention (every layer, or the sliding windows) ran as SDPA with its mask
