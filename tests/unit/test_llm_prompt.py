"""The LLM proposer's prompt against the model's limits, with litellm.completion replaced by a fake server that
counts tokens and refuses what does not fit, as vLLM and llama.cpp do: the history is budgeted into the context,
an overflow is retried once with half of it, a whole file is asked for only when it fits in max_tokens, and an
answer cut off at max_tokens is marked as such."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import litellm
import pytest

from farm.candidates import check_edit
from farm.settings import Settings
from scheduler import llm
from scheduler.llm import LLMConfig, LLMProposer
from scheduler.proposers import HistoryItem, ProposalContext, ProposerError

TEMPLATE = (Path(__file__).resolve().parents[2] / "training_template" / "train.py").read_text()
GOOD = """DESCRIPTION: raise the matrix learning rate
RATIONALE: a short budget rewards faster progress.
EDITS:
train.py
<<<<<<< SEARCH
MATRIX_LR = 0.04  # Muon, every 2-D block matrix
=======
MATRIX_LR = 0.05  # Muon, every 2-D block matrix
>>>>>>> REPLACE
"""


class FakeServer:
    """An OpenAI-compatible server with a `context` window; its tokenizer reads 3 characters a token (SmolLM2
    reads train.py at 3.0, history lines at 2.4: the estimate must hold for both)."""

    def __init__(self, context: int, answer: str = GOOD, finish: str = "stop") -> None:
        self.context, self.answer, self.finish = context, answer, finish
        self.prompts: list[list[dict[str, str]]] = []

    def __call__(self, *, model: str, messages: list[dict[str, str]], max_tokens: int, **kw: Any) -> Any:
        self.prompts.append(messages)
        used = sum(len(m["content"]) for m in messages) // 3 + 8 * len(messages)
        if used + max_tokens > self.context:
            raise litellm.ContextWindowExceededError(
                message=f"This model's maximum context length is {self.context} tokens. However, you requested "
                        f"{used + max_tokens} tokens ({used} in the messages, {max_tokens} in the completion).",
                model=model, llm_provider="openai")
        choice = SimpleNamespace(message=SimpleNamespace(content=self.answer), finish_reason=self.finish)
        return SimpleNamespace(choices=[choice], usage=SimpleNamespace(prompt_tokens=used, completion_tokens=50))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "_learned_context", {}, raising=False)


def _serve(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> FakeServer:
    monkeypatch.setattr(litellm, "completion", server)
    return server


def _history(n: int) -> list[HistoryItem]:
    """A long program as the scheduler lists it: every tenth a keep, the rest crashes and discards with their
    reasons, lines of about 300 characters (about 100 tokens) as real descriptions make them."""
    why = ("Raising the learning rate of the embeddings should speed up early progress within the short wall-clock "
           "budget, which rewards fast convergence")
    out = []
    for i in range(n):
        if i % 10 == 0:
            out.append(HistoryItem(i, "candidate", "llm", f"keep {i}: {why}", "keep", 0.99, 0.002))
        elif i % 3 == 0:
            out.append(HistoryItem(i, "candidate", "llm", f"idea {i}: {why}", "crashed",
                                   reason="Traceback (most recent call last): File train.py, line 120, in forward "
                                          "RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x512 and "
                                          "768x512)"))
        else:
            out.append(HistoryItem(i, "candidate", "llm", f"idea {i}: {why}", "discard", 0.998123, -0.000321,
                                   "mean improvement -0.000321 over 1 runs <= margin 0.004000 (k=2, sigma=0.002000); "
                                   "not an improvement beyond the noise floor"))
    return out


def _ctx(history: list[HistoryItem], files: dict[str, str] | None = None) -> ProposalContext:
    return ProposalContext(program_id=1, slug="p", profile="h100", instructions="Lower val_bpb.", head_commit="a" * 40,
                           head_files=files or {"train.py": TEMPLATE}, editable=["train.py"], history=history,
                           sigma=0.002, head_val_bpb=0.99)


def _cfg(**kw: Any) -> LLMConfig:
    values: dict[str, Any] = dict(model="openai/local-model", api_base="http://127.0.0.1:9/v1", api_key="k",
                                  temperature=0.0, max_tokens=4096, timeout=5.0, max_attempts=3, backoff=0.0)
    values.update(kw)
    return LLMConfig(**values)


def _user(messages: list[dict[str, str]]) -> str:
    return messages[-1]["content"]


def test_the_history_of_a_long_program_is_budgeted_into_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 32k model overflowed after about 210 experiments (100 tokens a line) and every later call failed alike."""
    server = _serve(monkeypatch, FakeServer(context=32_768))
    calls: list[Any] = []
    # a model litellm does not know and no FARM_LLM_CONTEXT_TOKENS: 32k assumed
    proposal = LLMProposer(_cfg(), record_call=lambda r: calls.append(r) or len(calls)).propose(_ctx(_history(1000)))
    assert proposal.edit.search_replace and len(server.prompts) == 1 and calls[0].error is None
    text = _user(server.prompts[0])
    assert "#998 [discard]" in text and "#999 [crashed]" in text  # the most recent outcomes, failures included
    assert "#0 [keep]" in text and "#500 [keep]" in text  # the head's lineage
    assert "#1 [discard]" not in text  # the oldest of the rest go first
    assert "older experiments omitted" in text


def test_an_overflow_is_retried_once_with_half_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local model litellm does not know: the farm assumes 32k, the server has 16k and says so."""
    server = _serve(monkeypatch, FakeServer(context=16_384))
    cfg = _cfg()
    calls: list[Any] = []
    proposal = LLMProposer(cfg, record_call=lambda r: calls.append(r) or len(calls)).propose(_ctx(_history(1000)))
    assert proposal.edit.search_replace and proposal.llm_call_ids == [1, 2]
    assert calls[0].error and "ContextWindowExceeded" in calls[0].error and calls[1].error is None
    first, second = (len(re.findall(r"^#\d+ \[", _user(p), re.M)) for p in server.prompts)
    assert 0 < second <= first // 2 + 1
    # later calls use the context the server named, at once
    LLMProposer(cfg).propose(_ctx(_history(1000)))
    assert len(server.prompts) == 3


def test_a_context_setting_larger_than_the_server_is_corrected_by_its_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: with FARM_LLM_CONTEXT_TOKENS set, the window a server named when it refused a prompt was
    ignored, so every later call was refused once and retried. The smaller of the two is used now."""
    server = _serve(monkeypatch, FakeServer(context=16_384))
    cfg = _cfg(context_tokens=65_536)
    LLMProposer(cfg).propose(_ctx(_history(1000)))
    assert len(server.prompts) == 2  # refused once, retried in the window the server named
    LLMProposer(cfg).propose(_ctx(_history(1000)))
    assert len(server.prompts) == 3  # at once


def test_an_overflow_on_the_retry_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _serve(monkeypatch, FakeServer(context=4096))  # train.py alone does not fit
    with pytest.raises(ProposerError, match="maximum context length"):
        LLMProposer(_cfg()).propose(_ctx(_history(50)))
    assert len(server.prompts) == 2


def test_the_context_window_comes_from_the_setting_then_litellm_then_a_default() -> None:
    local = dict(llm_model="openai/smollm2", llm_api_base="http://127.0.0.1:8000/v1")
    assert LLMConfig.resolve({}, Settings(**local, llm_context_tokens=8192)).context_window() == 8192
    assert LLMConfig.resolve({}, Settings(**local)).context_window() == llm.DEFAULT_CONTEXT_TOKENS
    assert LLMConfig.resolve({}, Settings(llm_model="openai/gpt-4o")).context_window() == 128_000
    assert LLMConfig.resolve({}, Settings(llm_model="openai/gpt-4o", llm_context_tokens=1000)).context_window() == 1000
    # the budget leaves room for the answer
    cfg = LLMConfig.resolve({}, Settings(**local, llm_context_tokens=8192, llm_max_tokens=1024))
    assert cfg.prompt_budget() < 8192 - 1024


def test_a_whole_file_answer_is_offered_only_when_the_file_fits_in_max_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py is about 6.8k tokens: at max_tokens 4096 a `FILE:` answer was always cut off and stored invalid."""
    server = _serve(monkeypatch, FakeServer(context=200_000))
    LLMProposer(_cfg(max_tokens=4096)).propose(_ctx([]))
    LLMProposer(_cfg(max_tokens=16_000)).propose(_ctx([]))
    LLMProposer(_cfg(max_tokens=4096)).propose(_ctx([], {"train.py": "MATRIX_LR = 0.04  # lr\n"}))
    offers = ["FILE:" in p[0]["content"] for p in server.prompts]
    assert offers == [False, True, True]


def test_an_answer_cut_off_at_max_tokens_is_marked_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    # the stored reason is tested in tests/unit/test_scheduler_embedded.py (record_proposal puts the defect first)
    cut = "DESCRIPTION: rewrite\nRATIONALE: x\nFILE: train.py\n```python\n" + TEMPLATE[:12_000]
    _serve(monkeypatch, FakeServer(context=200_000, answer=cut, finish="length"))
    ctx = _ctx([])
    proposal = LLMProposer(_cfg(max_tokens=4096)).propose(ctx)
    assert proposal.defect == "the answer was cut off at max_tokens=4096"
    assert check_edit(ctx.head_files, proposal.edit, ctx.editable).reason is not None
    # an answer that ends where it should has no defect
    _serve(monkeypatch, FakeServer(context=200_000, answer="DESCRIPTION: nothing\n"))
    assert LLMProposer(_cfg()).propose(ctx).defect is None


@pytest.mark.parametrize("finish", ["content_filter", "tool_calls"])
def test_an_answer_ended_for_another_reason_than_stop_is_marked_with_it(monkeypatch: pytest.MonkeyPatch,
                                                                         finish: str) -> None:
    """Found by review: a content filter's empty answer was stored as "the proposal contains no edit", with no word
    of the filter (only "length" was handled)."""
    _serve(monkeypatch, FakeServer(context=200_000, answer="", finish=finish))
    proposal = LLMProposer(_cfg()).propose(_ctx([]))
    assert proposal.defect is not None and f"finish_reason={finish!r}" in proposal.defect
    # a server that names no reason is taken at its word
    _serve(monkeypatch, FakeServer(context=200_000, answer="DESCRIPTION: nothing\n", finish=""))
    assert LLMProposer(_cfg()).propose(_ctx([])).defect is None


def test_text_outside_ascii_is_never_counted_below_a_tokenizer() -> None:
    """Found by review: at 3 characters a token, Chinese instructions were counted at a third of what a tokenizer
    gives, so a prompt meant to fit the context did not. Outside ASCII a character counts its UTF-8 bytes."""
    import litellm

    from scheduler.llm import estimate_tokens

    zh = "深度学习模型的训练需要大量的数据和计算资源。我们希望降低验证集上的每字节比特数。" * 20
    assert estimate_tokens(zh) >= litellm.token_counter(model="gpt-4", text=zh)
    mixed = "LR = 0.02  # 学习率\n" * 50
    assert estimate_tokens(mixed) >= litellm.token_counter(model="gpt-4", text=mixed)
