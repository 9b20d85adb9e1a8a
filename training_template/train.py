"""Train a small GPT for a fixed time budget, then hand it to the harness for evaluation.

This is the file to edit. prepare.py (data, clock, evaluation, result) and kernels/ are fixed.
Run: `python train.py` (FARM_PROFILE=cpu for a CPU run of a few seconds; see prepare.py for the environment).
Baseline: the autoresearch recipe (RMSNorm, RoPE + QK-norm, ReLU^2 MLP, gated value embeddings, residual/x0
scalars, logit softcap, untied head, sliding windows; Muon for matrices, AdamW for the rest).
"""

import gc
import math
import time

import kernels
import prepare
import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import pick
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# ======================================================================================================
# Model
# ======================================================================================================


def rotary_tables(seq_len, head_dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)


def window_mask_mod(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


ATTENTION = {"impl": "sdpa", "block_masks": {}, "flex_options": None}  # set once by configure_attention()


def configure_attention(impl, seq_len, windows, device, flex_options=None):
    """sdpa: dense boolean window masks, any device. flex: FlexAttention with block-sparse masks built here,
    once per window, so the compiled graph only looks them up. mixed: flex for the sliding windows, SDPA's
    causal kernel (FlashAttention / cuDNN on a GPU) for the layers that see the whole context. flex_options:
    FlexAttention's kernel_options (block sizes, warps, stages, TMA), for its compiled kernel."""
    ATTENTION["impl"] = impl
    ATTENTION["flex_options"] = dict(flex_options) if flex_options else None
    if impl in ("flex", "mixed"):
        for w in set(windows) - ({seq_len} if impl == "mixed" else set()):
            ATTENTION["block_masks"][(seq_len, w)] = create_block_mask(
                window_mask_mod(w), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def attend(q, k, v, window):
    """Causal attention over the last `window` positions; q, k, v: (B, H, T, D)."""
    T = q.size(2)
    if ATTENTION["impl"] == "flex" or (ATTENTION["impl"] == "mixed" and window < T):
        return flex_attention(q, k, v, block_mask=ATTENTION["block_masks"][(T, window)],
                              kernel_options=ATTENTION["flex_options"])
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(T, device=q.device)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, head_dim, window, has_ve):
        super().__init__()
        self.n_head, self.head_dim, self.window = n_head, head_dim, window
        inner = n_head * head_dim
        self.c_q = nn.Linear(dim, inner, bias=False)
        self.c_k = nn.Linear(dim, inner, bias=False)
        self.c_v = nn.Linear(dim, inner, bias=False)
        self.c_proj = nn.Linear(inner, dim, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, n_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # value embedding, mixed in by an input-dependent gate in (0, 2)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        dtype = q.dtype  # bf16 under autocast; norms and embeddings may hand back fp32
        q = kernels.rms_norm(kernels.apply_rotary(q, cos, sin))
        k = kernels.rms_norm(kernels.apply_rotary(k, cos, sin))
        q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, self.window)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(kernels.relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim, n_head, head_dim, window, has_ve):
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_head, head_dim, window, has_ve)
        self.mlp = MLP(dim)

    def forward(self, x, ve, cos, sin):
        x = x + self.attn(kernels.rms_norm(x), ve, cos, sin)
        return x + self.mlp(kernels.rms_norm(x))


def layer_windows(depth, seq_len, pattern):
    """Window per layer from a pattern like "SSSL" (S = half the context, L = all of it), repeated over the
    depth; the last layer always sees the whole context."""
    sizes = {"S": seq_len // 2, "L": seq_len}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(depth)]
    windows[-1] = seq_len
    return windows


class GPT(nn.Module):
    def __init__(self, vocab_size, depth, dim, n_head, head_dim, seq_len):
        super().__init__()
        self.depth, self.dim, self.n_head, self.head_dim, self.seq_len = depth, dim, n_head, head_dim, seq_len
        self.windows = layer_windows(depth, seq_len, WINDOW_PATTERN)
        self.has_ve = [i % 2 == (depth - 1) % 2 for i in range(depth)]  # alternating, last layer included
        self.wte = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, head_dim, self.windows[i], self.has_ve[i])
                                    for i in range(depth))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, n_head * head_dim)
                                           for i in range(depth) if self.has_ve[i]})
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(depth))
        cos, sin = rotary_tables(seq_len, head_dim, ROPE_BASE)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        bound = math.sqrt(3.0 / self.dim)  # uniform with std 1/sqrt(dim)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(X0_LAMBDA_INIT)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = kernels.rms_norm(self.wte(idx))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if self.has_ve[i] else None
            x = block(x, ve, cos, sin)
        x = kernels.rms_norm(x)
        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        return kernels.linear_softcap_cross_entropy(x.reshape(-1, self.dim), self.lm_head.weight,
                                                    targets.reshape(-1), SOFTCAP)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x non-embedding params + 12 x heads x head_dim x window per layer."""
        embedding = self.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())
        matmul = sum(p.numel() for p in self.parameters()) - embedding
        attention = sum(12 * self.n_head * self.head_dim * min(w, self.seq_len) for w in self.windows)
        return 6 * matmul + attention


# ======================================================================================================
# Optimizer
# ======================================================================================================

# Polar Express: per-iteration odd quintic coefficients (a, b, c) that drive singular values to 1 faster than
# a fixed Newton-Schulz quintic.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G, dtype):
    """Approximate U V^T of G = U S V^T for a stack of matrices (N, m, n)."""
    X = G.to(dtype)
    wide = X.size(-2) <= X.size(-1)
    if not wide:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= Frobenius norm < 1
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


def muon_update(params, grads, momentum, second, lr, weight_decay, mom, beta2, ortho_dtype):
    """One Muon step for a group of same-shape matrices, in place: Nesterov momentum, Polar Express
    orthogonalisation, NorMuon per-row variance normalisation, cautious weight decay. The four scalars are
    Python floats (eager) or 0-d CPU tensors (compiled: a changing schedule then never recompiles)."""
    g = torch.stack(grads)
    momentum.lerp_(g, 1 - mom)
    update = orthogonalize(g.lerp_(momentum, mom), ortho_dtype).float()
    # NorMuon: rows (output neurons) normalised by a running mean square, overall norm kept
    second.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
    norm_before = update.norm(dim=(-2, -1), keepdim=True)
    update = update * second.clamp_min(1e-10).rsqrt()
    update = update * (norm_before / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    rows, cols = g.shape[-2:]
    stacked = torch.stack(params)
    decay = (update * stacked > 0).to(stacked.dtype)  # cautious: decay only where the step shrinks |p|
    shape_lr = lr * max(1.0, rows / cols) ** 0.5
    stacked.sub_(shape_lr * update.to(stacked.dtype) + lr * weight_decay * decay * stacked)
    torch._foreach_copy_(params, list(stacked.unbind(0)))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices, same-shape matrices updated as one stack (muon_update). compile=True runs
    muon_update through torch.compile (one graph per shape); if compiling fails, it says so once and goes on eagerly."""

    def __init__(self, params, lr, momentum, weight_decay, beta2, ortho_dtype, compile=False):
        by_shape = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        groups = [{"params": ps} for ps in by_shape.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2))
        self.ortho_dtype = ortho_dtype
        self._compiled = torch.compile(muon_update, dynamic=False, fullgraph=True) if compile else None
        self._compiled_shapes = set()  # groups whose compiled update has run (each shape compiles on its first step)
        self._scalars = [torch.zeros((), dtype=torch.float32) for _ in range(4)]  # lr, wd, momentum, beta2

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            state = self.state[params[0]]
            if not state:
                shape, dev = (len(params), *params[0].shape), params[0].device
                state["momentum"] = torch.zeros(shape, device=dev, dtype=torch.float32)
                state["second"] = torch.zeros(shape[:-1] + (1,), device=dev, dtype=torch.float32)
            scalars = [group["lr"], group["weight_decay"], group["momentum"], group["beta2"]]
            buffers = (params, [p.grad for p in params], state["momentum"], state["second"])
            if self._compiled is not None:
                for tensor, value in zip(self._scalars, scalars, strict=True):
                    tensor.fill_(value)
                try:
                    self._compiled(*buffers, *self._scalars, self.ortho_dtype)
                    self._compiled_shapes.add(params[0].shape)
                    continue
                except Exception as exc:  # a compiler failure surfaces on a shape's first call, before any write
                    if params[0].shape in self._compiled_shapes:
                        raise
                    print(f"Muon: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "eager from now on", flush=True)
                    self._compiled = None
            muon_update(*buffers, *scalars, self.ortho_dtype)


# ======================================================================================================
# Hyperparameters (one per line: the search tool edits these lines)
# ======================================================================================================

DEPTH = pick(h100=8, cpu=2)  # transformer blocks
ASPECT_RATIO = pick(h100=64, cpu=32)  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = pick(h100=128, cpu=16)  # attention head size
MLP_RATIO = 4  # MLP hidden size / model_dim
WINDOW_PATTERN = pick(h100="SSSL", cpu="SL")  # per-layer windows, S = half context, L = full; last layer full
ROPE_BASE = 10000  # rotary embedding base
VE_GATE_CHANNELS = pick(h100=32, cpu=16)  # leading channels the value-embedding gate looks at
X0_LAMBDA_INIT = 0.1  # initial weight of the embedding skip into every block
SOFTCAP = 15  # logits = SOFTCAP * tanh(logits / SOFTCAP)
TOTAL_BATCH_SIZE = pick(h100=2**19, cpu=2**11)  # tokens per optimizer step
DEVICE_BATCH_SIZE = pick(h100=64, cpu=16)  # rows per forward/backward (gradient accumulation makes up the rest)
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings (scaled by (model_dim / 768) ** -0.5)
UNEMBEDDING_LR = 0.004  # AdamW, lm_head (same scaling)
MATRIX_LR = 0.04  # Muon, every 2-D block matrix
SCALAR_LR = 0.5  # AdamW, x0 scalars (residual scalars get 1 % of it)
WEIGHT_DECAY = 0.2  # Muon cautious weight decay
ADAM_BETAS = (0.8, 0.95)  # AdamW betas
MUON_MOMENTUM = 0.95  # Muon momentum after warm-up
MUON_MOMENTUM_START = 0.85  # Muon momentum at step 0
MUON_MOMENTUM_WARMUP = pick(h100=300, cpu=30)  # steps to reach MUON_MOMENTUM
MUON_BETA2 = 0.95  # NorMuon second-moment decay
WARMUP_RATIO = 0.0  # fraction of progress spent warming the learning rate up
WARMDOWN_RATIO = 0.5  # fraction of progress spent decaying it at the end
FINAL_LR_FRAC = 0.0  # learning-rate multiplier reached at the end of warmdown
COMPILE = True  # torch.compile the model (CUDA only; the CPU path runs eagerly)
COMPILE_MODE = "default"  # torch.compile mode of the model: "default" or "max-autotune-no-cudagraphs" (Triton GEMMs
#   with fused epilogues; autotuning takes minutes per shape the first time, then comes from the compile cache)
COMPILE_OPTIMIZER = True  # torch.compile the Muon update too (CUDA only)
ATTN_IMPL = "flex"  # flex (FlexAttention, CUDA), sdpa, or mixed (flex for windows, sdpa causal for L); CPU: sdpa
FLEX_OPTIONS = {}  # FlexAttention kernel_options, e.g. {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3, "USE_TMA": True}
KERNEL_OPS = "linear_ce"  # ops that use the fused kernels of kernels/: "all", "none" or a comma list of kernels.OPS
LOG_EVERY = pick(h100=25, cpu=10)  # print a progress line every this many steps

# ======================================================================================================
# Setup
# ======================================================================================================

torch.manual_seed(prepare.SEED)
kernels.limit_ops(KERNEL_OPS)  # the rest use their PyTorch references (FARM_KERNELS can only narrow it)
device = prepare.device()
cuda = device.type == "cuda"
if cuda:
    torch.set_float32_matmul_precision("high")
autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)

seq_len = prepare.MAX_SEQ_LEN
model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
n_head = model_dim // HEAD_DIM
# a device batch larger than the whole step shrinks to it, so halving TOTAL_BATCH_SIZE is a valid edit
device_rows = min(DEVICE_BATCH_SIZE, max(1, TOTAL_BATCH_SIZE // seq_len))
grad_accum = TOTAL_BATCH_SIZE // (device_rows * seq_len)
assert grad_accum >= 1 and grad_accum * device_rows * seq_len == TOTAL_BATCH_SIZE, "batch sizes must divide"

raw_model = GPT(prepare.vocab_size(), DEPTH, model_dim, n_head, HEAD_DIM, seq_len)
raw_model.init_weights()
raw_model.to(device)
configure_attention(ATTN_IMPL if cuda else "sdpa", seq_len, raw_model.windows, device, FLEX_OPTIONS)
model = torch.compile(raw_model, dynamic=False, mode=COMPILE_MODE) if COMPILE and cuda else raw_model

lr_scale = (model_dim / 768) ** -0.5
matrices = [p for p in raw_model.blocks.parameters() if p.dim() == 2]
adam_groups = [
    dict(params=[raw_model.wte.weight, *raw_model.value_embeds.parameters()], lr=EMBEDDING_LR * lr_scale),
    dict(params=[raw_model.lm_head.weight], lr=UNEMBEDDING_LR * lr_scale),
    dict(params=[raw_model.x0_lambdas], lr=SCALAR_LR),
    dict(params=[raw_model.resid_lambdas], lr=SCALAR_LR * 0.01),
]
adamw = torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=cuda)
muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, weight_decay=WEIGHT_DECAY, beta2=MUON_BETA2,
            ortho_dtype=torch.bfloat16 if cuda else torch.float32, compile=COMPILE_OPTIMIZER and cuda)
optimizers = [adamw, muon]
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
n_params = sum(p.numel() for p in raw_model.parameters())
assert n_params == sum(p.numel() for g in adam_groups for p in g["params"]) + sum(p.numel() for p in matrices)

loader = prepare.make_dataloader(device_rows, device, seq_len)
print(f"profile {prepare.PROFILE.name} on {device}: depth {DEPTH}, dim {model_dim}, heads {n_head}, "
      f"params {n_params / 1e6:.2f}M, windows {raw_model.windows}, grad_accum {grad_accum}, "
      f"budget {prepare.TIME_BUDGET:g}s", flush=True)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    left = (1.0 - progress) / WARMDOWN_RATIO
    return left + (1.0 - left) * FINAL_LR_FRAC


# ======================================================================================================
# Loop
# ======================================================================================================

clock = prepare.Clock(model)  # given the model, a gated start compiles the evaluation before its turn too
smooth_loss, t_log = 0.0, time.time()
while not clock.done:
    lrm = lr_multiplier(clock.progress)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    warm = min(1.0, clock.steps / MUON_MOMENTUM_WARMUP)
    for group in muon.param_groups:
        group["momentum"] = MUON_MOMENTUM_START + warm * (MUON_MOMENTUM - MUON_MOMENTUM_START)

    for _ in range(grad_accum):
        x, y = next(loader)
        with autocast:
            loss = model(x, y)
        (loss / grad_accum).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)

    loss_value = loss.item()
    clock.tick(TOTAL_BATCH_SIZE, loss_value)  # fast-fails on NaN / exploding loss
    if clock.steps == 1:  # the reference's trick: no garbage-collector pauses inside the loop
        gc.collect()
        gc.freeze()
        gc.disable()
    smooth_loss = loss_value if clock.steps == 1 else 0.9 * smooth_loss + 0.1 * loss_value
    if clock.steps % LOG_EVERY == 0:
        rate = clock.timed_tokens / clock.training_seconds if clock.training_seconds else 0.0
        print(f"step {clock.steps:5d} | loss {smooth_loss:.4f} | lrm {lrm:.2f} | progress {clock.progress:.3f} "
              f"| {rate:,.0f} tok/s", flush=True)

# ======================================================================================================
# Eval + summary: the harness evaluates val/test, writes the signed JSON, prints the summary, exits
# ======================================================================================================

prepare.finish(model, clock, depth=DEPTH)
