"""Unit tests of the training template's harness (training_template/prepare.py): bpb arithmetic, packing,
tokenizers, splits, the nonce/digest contract, the harness checksum and the clock's fast fail."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TEMPLATE = Path(__file__).resolve().parents[2] / "training_template"
sys.path.insert(0, str(TEMPLATE))

import prepare  # noqa: E402


def _python(code: str, env: dict | None = None, pass_fds=()) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    full_env.update({"FARM_PROFILE": "cpu"}, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=TEMPLATE, env=full_env, capture_output=True,
                          text=True, timeout=60, pass_fds=pass_fds)


# ----- bits per byte -----

def test_bpb_matches_a_hand_computed_case():
    # Uniform logits over 4 tokens: every target costs ln 4 nats. Token bytes: 0 (special), 1, 2, 3.
    logits = torch.zeros(1, 2, 4)
    token_bytes = torch.tensor([0, 1, 2, 3])
    nats, nbytes = prepare.bpb_terms(logits, torch.tensor([[1, 3]]), token_bytes)
    assert nats == pytest.approx(2 * math.log(4))
    assert nbytes == 4
    assert prepare.bits_per_byte(nats, nbytes) == pytest.approx(2 * 2 / 4)  # 2 tokens x 2 bits / 4 bytes


def test_bpb_with_a_peaked_distribution():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])  # p(token 0) = e^2 / (e^2 + 2)
    nats, nbytes = prepare.bpb_terms(logits, torch.tensor([[0]]), torch.tensor([3, 1, 1]))
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nats == pytest.approx(expected)
    assert prepare.bits_per_byte(nats, nbytes) == pytest.approx(expected / (math.log(2) * 3))


def test_special_tokens_count_neither_nats_nor_bytes():
    logits = torch.randn(2, 3, 5)
    token_bytes = torch.tensor([0, 1, 2, 1, 4])
    targets = torch.tensor([[0, 1, 0], [4, 0, 2]])
    nats, nbytes = prepare.bpb_terms(logits, targets, token_bytes)
    keep = targets != 0
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert nats == pytest.approx(float(manual), rel=1e-5)
    assert nbytes == 1 + 4 + 2


def test_padded_vocab_logits_use_the_real_vocab_only():
    logits = torch.zeros(1, 1, 6)
    logits[..., 4:] = 50.0  # padding columns the harness must ignore
    nats, _ = prepare.bpb_terms(logits, torch.tensor([[1]]), torch.tensor([0, 1, 1, 1]))
    assert nats == pytest.approx(math.log(4))


def test_summary_block_format():
    result = {"val_bpb": 0.9979, "training_seconds": 300.06, "total_seconds": 325.94, "peak_vram_mb": 45060.2,
              "mfu_percent": 39.8, "total_tokens_m": 499.6, "num_steps": 953, "num_params_m": 50.3, "depth": 8}
    assert prepare.format_summary(result) == (
        "---\n"
        "val_bpb:          0.997900\n"
        "training_seconds: 300.1\n"
        "total_seconds:    325.9\n"
        "peak_vram_mb:     45060.2\n"
        "mfu_percent:      39.80\n"
        "total_tokens_M:   499.6\n"
        "num_steps:        953\n"
        "num_params_M:     50.3\n"
        "depth:            8\n")


# ----- packing -----

def _docs(n: int, seed: int, bos: int = 0, max_len: int = 90) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # doc k = BOS, then k*1000 + 1, k*1000 + 2, ...: every token says which document and position it is
    return [np.array([bos] + [k * 1000 + j for j in range(1, int(rng.integers(1, max_len)))]) for k in range(n)]


def test_packing_rows_start_with_bos_and_lose_only_the_crop():
    docs = _docs(300, seed=0)
    row_len = 33
    stats: dict = {}
    rows = list(prepare.pack_rows(iter(docs), row_len, buffer_docs=16, stats=stats))
    assert rows and all(len(r) == row_len and r[0] == 0 for r in rows)
    seen = set()
    for row in rows:
        starts = np.flatnonzero(row == 0)
        for a, b in zip(starts, list(starts[1:]) + [row_len], strict=True):
            segment = row[a + 1:b]
            k = int(segment[0]) // 1000 if len(segment) else None
            if k is None:
                continue  # a document cropped to its BOS alone
            assert k not in seen, "a document was used twice"
            seen.add(k)
            assert list(segment) == list(docs[k][1:1 + len(segment)]), "segments are document prefixes"
    total = sum(len(d) for d in docs)
    assert stats["used"] == len(rows) * row_len
    assert stats["used"] + stats["cropped"] + stats["left_over"] == total


def test_packing_without_long_documents_crops_little():
    docs = _docs(500, seed=1, max_len=20)
    stats: dict = {}
    rows = list(prepare.pack_rows(iter(docs), 65, buffer_docs=100, stats=stats))
    assert len(rows) > 50
    assert stats["cropped"] < 0.02 * stats["used"]


def test_chunked_documents_start_with_bos_and_keep_every_token():
    tokens = np.arange(1, 301, dtype=np.uint16)
    pieces = prepare.chunk_document(tokens, bos_id=0, seq_len=128)
    assert [len(p) for p in pieces] == [129, 129, 45]
    assert all(p[0] == 0 for p in pieces)
    assert np.array_equal(np.concatenate([p[1:] for p in pieces]), tokens)


# ----- tokenizers -----

SAMPLES = ["In the beginning God created the heaven and the earth.", "naïve café — 日本語 🙂\n\n  spaced  out\t",
           "Numbers 12345 and symbols #!?$ (parens)", ""]


def test_byte_tokenizer_round_trip():
    tok = prepare.ByteTokenizer()
    tb = tok.token_bytes()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert tb[tok.bos_id] == 0 and tok.vocab_size == 257


def test_bpe_tokenizer_round_trip_on_a_small_corpus(tmp_path):
    texts = [text for _, (_, text) in zip(range(60), prepare.bible_documents(), strict=False)]
    tok = prepare.BPETokenizer.train(iter(texts), vocab_size=400)
    assert tok.vocab_size == 400 and tok.bos_id is not None
    tb = tok.token_bytes()
    assert tb[tok.bos_id] == 0
    for text in SAMPLES + texts[:3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), "token bytes add up to the text's bytes"
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode())  # it learned merges
    tok.save(tmp_path)
    again = prepare.load_tokenizer(tmp_path)
    assert again.encode(texts[1]) == tok.encode(texts[1])
    # the BOS token's text inside a document is text (found by review: it became BOS, its 7 bytes uncounted)
    text = "In the beginning <|bos|> God"
    for t in (tok, again):
        ids = t.encode(text)
        assert tok.bos_id not in ids and int(tb[ids].sum()) == len(text.encode("utf-8")) and t.decode(ids) == text
        docs = t.encode_docs([text])
        assert docs[0].tolist() == ids


# ----- splits -----

def test_splits_are_disjoint_deterministic_and_sized():
    keys = {"train": set(), "val": set(), "test": set()}
    for key, _ in prepare.bible_documents():
        keys[prepare.split_of(key)].add(key)
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"])
    assert not (keys["val"] & keys["test"])
    n = sum(len(v) for v in keys.values())
    assert n == 1189  # chapters of the King James Bible
    assert 0.03 * n < len(keys["val"]) < 0.08 * n and 0.03 * n < len(keys["test"]) < 0.08 * n
    assert all(prepare.split_of(k) == "val" for k in keys["val"])


def test_built_cache_has_disjoint_splits_and_needs_no_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", no_network)
    path = prepare.build_cache(prepare.PROFILES["cpu"], "bible", tmp_path / "data", tmp_path / "cache",
                               log=lambda _: None)
    data = prepare.Data(path)
    docs = {}
    for split in prepare.SPLITS:
        tokens, offsets = data.split(split)
        assert offsets[-1] == len(tokens) > 0
        assert all(tokens[o] == data.bos_id for o in offsets[:-1])
        docs[split] = {bytes(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
    # Chapters are split by key (test above); the Bible repeats some passages word for word (2 Kings 19 and
    # Isaiah 37), so a few 128-byte pieces recur across splits, never more than that.
    assert len(docs["train"] & docs["test"]) < 0.02 * len(docs["test"])
    assert len(docs["val"] & docs["test"]) < 0.02 * len(docs["test"])
    assert len(prepare.eval_rows("val")) == prepare.PROFILES["cpu"].eval_tokens // 128


# ----- nonce, digest, checksum -----

def test_result_digest_is_hmac_of_canonical_json():
    import hashlib
    import hmac
    payload = {"val_bpb": 1.25, "b": [1, 2], "nonce": "ab12", "digest": "ignored"}
    canonical = json.dumps({"b": [1, 2], "nonce": "ab12", "val_bpb": 1.25}, sort_keys=True, separators=(",", ":"))
    expected = hmac.new(b"ab12", canonical.encode(), hashlib.sha256).hexdigest()
    assert prepare.result_digest(payload, "ab12") == expected
    assert prepare.result_digest(payload, "") != expected


def test_nonce_is_read_from_the_fd_then_fd_and_env_are_gone():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"c0ffee42\n")
    os.close(write_fd)
    code = (
        "import os, json, prepare\n"
        f"fd = {read_fd}\n"
        "try:\n    os.fstat(fd); closed = False\nexcept OSError:\n    closed = True\n"
        "signed = prepare._sign({'x': 1})\n"
        "print(json.dumps({'env': os.environ.get('FARM_NONCE_FD'), 'closed': closed, 'signed': signed}))\n")
    proc = _python(code, {"FARM_NONCE_FD": str(read_fd)}, pass_fds=(read_fd,))
    os.close(read_fd)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env"] is None and out["closed"] is True
    assert out["signed"]["nonce"] == "c0ffee42"
    assert out["signed"]["digest"] == prepare.result_digest(out["signed"], "c0ffee42")


def test_bad_nonce_fd_exits_2():
    assert _python("import prepare", {"FARM_NONCE_FD": "987"}).returncode == 2


def test_harness_checksum_detects_an_edited_harness(tmp_path):
    copy = tmp_path / "tpl"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    original = prepare.harness_checksum(TEMPLATE)
    assert prepare.harness_checksum(copy) == original
    (copy / "train.py").write_text("# the candidate's file may change freely\n")
    assert prepare.harness_checksum(copy) == original
    prep = copy / "prepare.py"
    prep.write_text(prep.read_text().replace("LOSS_LIMIT = 100.0", "LOSS_LIMIT = 1e9"))
    assert prepare.harness_checksum(copy) != original
    shutil.copy(TEMPLATE / "prepare.py", prep)
    (copy / "kernels" / "extra.py").write_text("x = 1\n")
    assert prepare.harness_checksum(copy) != original


# ----- clock -----

def test_clock_progress_is_max_of_time_and_step_fractions(monkeypatch):
    monkeypatch.setattr(prepare, "TIME_BUDGET", 1000.0)
    monkeypatch.setattr(prepare, "MAX_STEPS", 4)
    clock = prepare.Clock()
    assert clock.progress == 0.0 and not clock.done
    for _ in range(2):
        clock.tick(10, 1.0)
    assert clock.progress == pytest.approx(0.5)
    for _ in range(2):
        clock.tick(10, 1.0)
    assert clock.done and clock.tokens == 40
    monkeypatch.setattr(prepare, "TIME_BUDGET", 0.0)
    assert prepare.Clock().done  # a zero budget evaluates the untrained model


def test_clock_fails_fast_on_nan_with_exit_3():
    proc = _python("import prepare\nc = prepare.Clock()\nc.tick(1, 2.0)\nc.tick(1, float('nan'))\nprint('survived')")
    assert proc.returncode == 3
    assert "FAIL" in proc.stdout and "survived" not in proc.stdout


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), 1e4, prepare.LOSS_LIMIT + 1])
def test_clock_rejects_diverged_losses(loss, monkeypatch):
    calls = []

    def fake_die(code, message):
        calls.append(code)
        raise RuntimeError(message)

    monkeypatch.setattr(prepare, "_die", fake_die)
    clock = prepare.Clock()
    clock.tick(1, 5.0)
    with pytest.raises(RuntimeError, match="FAIL"):
        clock.tick(1, loss)
    assert calls == [3]


def test_unknown_profile_exits_2():
    assert _python("import prepare", {"FARM_PROFILE": "tpu"}).returncode == 2


def test_pick_uses_the_active_profile():
    assert prepare.PROFILE.name == "cpu"  # the test process has no CUDA and no FARM_PROFILE
    assert prepare.pick(h100=8, cpu=2) == 2
    with pytest.raises(KeyError):
        prepare.pick(h100=8)


def test_hyperparameters_are_one_line_each():
    source = (TEMPLATE / "train.py").read_text()
    section = source.split("# Hyperparameters")[1].split("# Setup")[0]
    lines = [ln for ln in section.splitlines() if re.match(r"^[A-Z][A-Z0-9_]* =", ln)]
    assert len(lines) >= 20
    pattern = re.compile(r"^[A-Z][A-Z0-9_]* = (pick\([a-z0-9_]+=[^,()]+(, [a-z0-9_]+=[^,()]+)*\)|[^#]+?)  # \S.*$")
    bad = [ln for ln in lines if not pattern.match(ln)]
    assert not bad, bad
    assert re.search(r"^KERNEL_OPS = \"linear_ce\"  # ", section, flags=re.M)


# ----- device gate (FARM_GATE_FD) -----

_GATED = """import time, prepare
c = prepare.Clock()
print("ready", flush=True)
c.tick(1, 2.0)
c.tick(1, 2.0)
print(f"waited {c.gate_wait_seconds:.3f} training {c.training_seconds:.3f}", flush=True)
"""


def _gated_run(delay: float, *, close_instead: bool = False) -> tuple[int, str, float, float]:
    """Run two ticks with a gate the test opens `delay` seconds after the child is ready for its first step."""
    import time

    rfd, wfd = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_PROFILE="cpu", FARM_GATE_FD=str(rfd), FARM_TIME_BUDGET="100")
    proc = subprocess.Popen([sys.executable, "-c", _GATED], cwd=TEMPLATE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, pass_fds=(rfd,))
    os.close(rfd)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "ready", first + proc.stdout.read()
        time.sleep(delay)
        if not close_instead:
            os.write(wfd, b"g")
        os.close(wfd)
        out = proc.stdout.read()
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    m = re.search(r"waited ([\d.]+) training ([\d.]+)", out)
    assert m, out
    return code, out, float(m.group(1)), float(m.group(2))


def test_first_tick_waits_at_the_gate_and_the_wait_is_not_training():
    code, out, waited, training = _gated_run(1.0)
    assert code == 0, out
    assert 0.9 < waited < 5.0
    assert training < 0.5  # the second tick is timed (one untimed step on cpu); the wait is not in it


def test_a_closed_gate_pipe_opens_the_gate():
    # the worker died or closed its end: EOF lets the run go on (the sandbox ends it with its parent anyway)
    code, out, waited, _ = _gated_run(0.3, close_instead=True)
    assert code == 0, out
    assert waited > 0.2


def test_a_bad_gate_fd_is_an_environment_error():
    proc = _python("import prepare", {"FARM_GATE_FD": "987"})
    assert proc.returncode == 2 and "FARM_GATE_FD" in proc.stderr


# ----- FARM_TORCH_PROFILE summary on CUDA -----

def test_step_profile_summary_groups_cuda_kernels_by_kind(tmp_path):
    # No GPU here: the summary's CUDA branch gets the events a CUDA profile has (kernels with device time,
    # optimizer ranges that own their kernels' device time) as stand-ins for torch's key_averages() rows.
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(key, count, self_dev, dev=0.0, device=cuda, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=self_dev,
                               device_time_total=dev or self_dev, self_cpu_time_total=cpu_us, cpu_time_total=cpu_us,
                               is_user_annotation=annotation)

    # as torch 2.11 gave them on an H200: Inductor's kernels also have a CPU range of their own name (the launch)
    # carrying their device time; an optimizer's range has a device span marked as a user annotation
    table = [
        evt("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 40, 120_000.0),
        evt("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 20, 60_000.0),
        evt("triton_tem_fused_flex_attention_0", 16, 50_000.0),
        evt("triton_tem_fused_flex_attention_0", 16, 50_000.0, device=cpu, cpu_us=200.0),
        evt("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", 64, 30_000.0),
        evt("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", 64, 30_000.0, device=cpu, cpu_us=300.0),
        evt("_softcap_ce_fwd_kernel", 8, 10_000.0),
        evt("Memcpy HtoD (Pinned -> Device)", 8, 2_000.0),
        evt("void at::native::vectorized_elementwise_kernel<4, ...>", 100, 8_000.0),
        evt("Optimizer.step#Muon.step", 2, 0.0, dev=20_000.0, device=cpu, cpu_us=3_000.0),
        evt("Optimizer.step#Muon.step", 2, 21_000.0, annotation=True),  # the range's span: not a kernel
        evt("Optimizer.step#AdamW.step", 2, 4_000.0, annotation=True),  # here only the device span carries it
        evt("Optimizer.step#AdamW.step", 2, 0.0, device=cpu, cpu_us=1_000.0),
        evt("aten::mm", 60, 0.0, device=cpu, cpu_us=5_000.0),
    ]
    _check_cuda_summary(table, tmp_path)


def test_step_profile_summary_without_the_annotation_mark(tmp_path):
    # a torch whose events carry no user-annotation mark: device rows named like a CPU range are the ranges
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(key, count, self_dev, dev=0.0, device=cuda, cpu_us=0.0):
        return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=self_dev,
                               device_time_total=dev or self_dev, self_cpu_time_total=cpu_us, cpu_time_total=cpu_us)

    table = [
        evt("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 40, 120_000.0),
        evt("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 20, 60_000.0),
        evt("triton_tem_fused_flex_attention_0", 16, 50_000.0),
        evt("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", 64, 30_000.0),
        evt("_softcap_ce_fwd_kernel", 8, 10_000.0),
        evt("Memcpy HtoD (Pinned -> Device)", 8, 2_000.0),
        evt("void at::native::vectorized_elementwise_kernel<4, ...>", 100, 8_000.0),
        evt("Optimizer.step#Muon.step", 2, 0.0, dev=20_000.0, device=cpu, cpu_us=3_000.0),
        evt("Optimizer.step#Muon.step", 2, 21_000.0),
        evt("Optimizer.step#AdamW.step", 2, 4_000.0),
        evt("Optimizer.step#AdamW.step", 2, 0.0, device=cpu, cpu_us=1_000.0),
        evt("aten::mm", 60, 0.0, device=cpu, cpu_us=5_000.0),
    ]
    _check_cuda_summary(table, tmp_path)


def _check_cuda_summary(table, tmp_path):
    profile = prepare.StepProfile(str(tmp_path / "p.txt"), 2, cuda=False)
    profile._profiled = 2
    profile._write(table, wall=0.4)
    text = (tmp_path / "p.txt").read_text()
    busy = 280_000.0
    assert f"device busy 0.280 s = {100 * busy / 1e6 / 0.4:.1f} % of the wall" in text
    kinds = {m.group(1).strip(): float(m.group(2)) for m in
             re.finditer(r"^(.{40}) +(\d+\.\d+) +\d+\.\d$", text, re.M)}
    assert kinds == {"matmul (cuBLAS / CUTLASS)": 90.0, "attention (FlexAttention / SDPA)": 25.0,
                     "Inductor fused (triton_*)": 15.0, "farm Triton kernels": 5.0, "copies and fills": 1.0,
                     "other ATen (eager ops)": 4.0}
    assert re.search(r"^Optimizer\.step#Muon\.step +10\.50 +1\.50$", text, re.M), text
    assert re.search(r"^Optimizer\.step#AdamW\.step +2\.00 +0\.50$", text, re.M), text
    top = text.split("top device time")[1].splitlines()[1:]
    assert top[0].split()[:3] == ["60.00", "42.9", "40"] and "aten::mm" not in text.split("top device time")[1]


def test_concurrent_builders_of_one_cache_both_succeed(tmp_path):
    """Found by review: the build folder was named by pid alone and removed first, so two builders with one pid
    (threads here; worker containers sharing the cache volume in compose) deleted each other's work."""
    import concurrent.futures

    def build(_: int) -> Path:
        return prepare.build_cache(prepare.PROFILES["cpu"], "bible", tmp_path / "data", tmp_path / "cache",
                                   log=lambda _: None)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(build, range(2)))
    assert paths[0] == paths[1] and (paths[0] / "manifest.json").exists()
    assert not list((tmp_path / "cache").glob(".*.building"))
    assert prepare.Data(paths[0]).split("val")[0].size > 0
