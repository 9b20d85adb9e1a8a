"""LLM proposer through litellm: any model string, local or hosted.

The prompt holds the program's instructions, the measured noise floor, a compact history of every
past experiment of the program (so nothing that failed is forgotten) and the head's editable files.
The answer format is a DESCRIPTION line, a RATIONALE and SEARCH/REPLACE blocks (or whole files
after `FILE: name`). Parsing never raises: an answer with no usable edit becomes a proposal with
an empty edit, which record_proposal stores as `invalid` with its reason.

Calls run on the scheduler's thread pool (several in flight), retry rate limits, timeouts and
server errors with exponential backoff, and every attempt is recorded through `record_call`
(tokens, cost from litellm's cost map, 0 for unknown or local models, latency, error).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.candidates import Edit
from farm.settings import Settings
from scheduler.proposers import HistoryItem, Proposal, ProposalContext, ProposerError

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 400_000
MAX_HISTORY_LINES = 400


@dataclass(frozen=True)
class CallRecord:
    model: str
    purpose: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float
    error: str | None


RecordCall = Callable[[CallRecord], int | None]


@dataclass(frozen=True)
class LLMConfig:
    model: str
    api_base: str | None
    api_key: str | None
    temperature: float
    max_tokens: int
    timeout: float
    max_attempts: int = 4
    backoff: float = 1.0

    @classmethod
    def resolve(cls, proposer: dict[str, Any], settings: Settings) -> LLMConfig:
        """The program's proposer config over the farm settings (an api key may be named by env var)."""
        key = str(proposer.get("api_key") or "")
        if not key and proposer.get("api_key_env"):
            key = os.environ.get(str(proposer["api_key_env"]), "")
        return cls(
            model=str(proposer.get("model") or settings.llm_model),
            api_base=str(proposer.get("api_base") or settings.llm_api_base) or None,
            # a local OpenAI-compatible server still needs some key; hosted providers fall back to
            # their own variables (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...) when none is configured
            api_key=key or settings.llm_api_key.get_secret_value()
            or ("none" if (proposer.get("api_base") or settings.llm_api_base) else None),
            temperature=float(proposer.get("temperature", settings.llm_temperature)),
            max_tokens=int(proposer.get("max_tokens", settings.llm_max_tokens)),
            timeout=float(proposer.get("timeout", settings.llm_timeout)),
            max_attempts=int(proposer.get("max_attempts", 4)),
            backoff=float(proposer.get("backoff", 1.0)),
        )


SYSTEM = """You are a machine-learning researcher improving a small GPT training script.
Each experiment trains for a fixed wall-clock budget; the goal is the lowest val_bpb (validation
bits per byte; lower is better). Propose ONE focused change that has not been tried before.
Differences smaller than the noise floor are not real improvements.

Answer in exactly this format:
DESCRIPTION: <one line, what the change does>
RATIONALE: <one to three sentences, why it should lower val_bpb>
EDITS:
<file name>
<<<<<<< SEARCH
<exact lines copied from the current file>
=======
<replacement lines>
>>>>>>> REPLACE

You may give several SEARCH/REPLACE blocks. The SEARCH text must match the file exactly, once.
Instead of blocks you may give a whole file as `FILE: <name>` followed by a fenced code block.
Only the editable files may change. Do not add dependencies."""


def _fmt_item(h: HistoryItem) -> str:
    val = f"{h.val_bpb:.6f}" if h.val_bpb is not None else "-"
    delta = f"{h.delta:+.6f}" if h.delta is not None else ""
    reason = f" | {' '.join(h.reason.split())[:160]}" if h.reason and h.status not in ("keep",) else ""
    desc = " ".join(h.description.split())[:140]
    return f"#{h.experiment_id} [{h.status}] {val} {delta} {desc}{reason}".replace("  ", " ")


def history_text(history: list[HistoryItem]) -> str:
    if not history:
        return "(no experiments yet)"
    lines = [_fmt_item(h) for h in history]
    if len(lines) > MAX_HISTORY_LINES:
        # the oldest lines are summarised by count; keeps and recent ones stay verbatim
        kept = [_fmt_item(h) for h in history[:-MAX_HISTORY_LINES] if h.status == "keep"]
        lines = [f"({len(lines) - MAX_HISTORY_LINES} older experiments omitted, their keeps follow)", *kept,
                 *lines[-MAX_HISTORY_LINES:]]
    return "\n".join(lines)


def build_messages(ctx: ProposalContext) -> list[dict[str, str]]:
    noise = (f"Measured noise floor: sigma = {ctx.sigma:.6f} bpb between seeds of identical code."
             if ctx.sigma is not None else "Noise floor: not measured yet.")
    head = f"Current head val_bpb: {ctx.head_val_bpb:.6f}." if ctx.head_val_bpb is not None else ""
    files = "\n\n".join(f"{name}\n```python\n{text}\n```" for name, text in ctx.head_files.items())
    parts = [f"# Research program\n{ctx.instructions.strip()}",
             f"# Status\n{noise} {head}\nEditable files: {', '.join(ctx.editable)}.",
             "# History (id [outcome] val_bpb improvement-vs-parent description | reason)\n"
             + history_text(ctx.history)]
    if ctx.repair_of is not None:
        parts.append(f"# Repair\nExperiment #{ctx.repair_of} crashed. Fix the bug while keeping its idea. "
                     f"Its change was:\n```diff\n{ctx.repair_diff[-6000:]}\n```\n"
                     f"The end of its log:\n```\n{ctx.repair_log[-4000:]}\n```\n"
                     "The files below are the crashed version; edit them.")
    parts.append(f"# Current files\n{files}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# A label's leading markup (`**`, `#`, `- `) is `[^\w\n]*`, never `\W*`: that crosses newlines, so at every line
# start it ran to the end of a run of markup-only lines and an answer of 8k `-` lines took 4 s (quadratic).
_DESC = re.compile(r"^[^\w\n]*description\W*:\s*(?P<d>.+)$", re.I | re.M)
_RAT = re.compile(r"^[^\w\n]*rationale\W*:\s*(?P<r>.+?)"
                  r"(?=\n\s*\n|\n[^\w\n]*edits\W*:|\n[^\n]*\n?<{5,9} SEARCH|\Z)", re.I | re.M | re.S)
_EDITS = re.compile(r"^[^\w\n]*edits\W*:\s*$", re.I | re.M)
_FILE = re.compile(r"^[^\w\n]*FILE\W*:\s*`?(?P<name>[\w./-]+)`?\s*\n```[\w+-]*\n(?P<body>.*?)\n```",
                   re.M | re.S)
_FENCE = re.compile(r"```[\w+-]*\n(?P<body>.*?)\n```", re.S)


def parse_answer(text: str, editable: list[str], current: dict[str, str]) -> Proposal:
    """Description, rationale and edit from a model's answer; an unusable answer gives an empty edit."""
    raw = text or ""
    text = raw[:MAX_ANSWER_CHARS]
    m = _DESC.search(text)
    if m:
        description = m.group("d").strip()
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(
            ("```", "<<<<<<<", "=======", ">>>>>>>"))), "")
        description = first
    description = " ".join(description.split())[:200] or "(no description)"
    r = _RAT.search(text)
    rationale = " ".join(r.group("r").split())[:2000] if r else ""
    edit = Edit()
    if "<<<<<<< SEARCH" in text or ">>>>>>> REPLACE" in text:
        em = _EDITS.search(text)
        body = text[em.end():] if em else text
        if not em:
            # drop the DESCRIPTION / RATIONALE lines so they cannot be read as a file name
            body = _DESC.sub("", body)
            body = _RAT.sub("", body)
        edit = Edit(search_replace=body.strip("\n"))
    else:
        files = {fm.group("name"): fm.group("body") + "\n" for fm in _FILE.finditer(text)}
        if not files and len(editable) == 1:
            # a single fenced block that looks like the whole file
            only = editable[0]
            blocks = [b.group("body") for b in _FENCE.finditer(text)]
            if blocks:
                best = max(blocks, key=len)
                if len(best) >= 0.5 * len(current.get(only, "")):
                    files = {only: best + "\n"}
        if files:
            edit = Edit(files=files)
    return Proposal(description=description, rationale=rationale, edit=edit, raw=raw)


def _retryable() -> tuple[type[BaseException], ...]:
    from litellm import exceptions as ex

    return (ex.RateLimitError, ex.Timeout, ex.APIConnectionError, ex.ServiceUnavailableError,
            ex.InternalServerError, ex.BadGatewayError)


def _usage(resp: Any) -> tuple[int, int]:
    usage = getattr(resp, "usage", None)
    if usage is None:
        return 0, 0
    return int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


def _cost(resp: Any) -> float:
    import litellm

    try:
        return float(litellm.completion_cost(completion_response=resp) or 0.0)
    except Exception:  # unknown or local model: no price in the cost map
        return 0.0


class LLMProposer:
    kind = "llm"
    inline = False

    def __init__(self, config: LLMConfig, record_call: RecordCall | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import litellm  # noqa: F401  # import once in the caller's thread: a first import takes seconds

        self.config = config
        self.record_call = record_call
        self.sleep = sleep

    def complete(self, messages: list[dict[str, str]], purpose: str = "propose") -> tuple[str, list[int]]:
        """The answer text, with retries; the ids of the recorded calls. ProposerError when all attempts fail."""
        import litellm

        cfg = self.config
        ids: list[int] = []
        last = ""
        for attempt in range(cfg.max_attempts):
            t0 = time.monotonic()
            try:
                resp = litellm.completion(model=cfg.model, messages=messages, api_base=cfg.api_base,
                                          api_key=cfg.api_key, temperature=cfg.temperature,
                                          max_tokens=cfg.max_tokens, timeout=cfg.timeout, num_retries=0)
            except Exception as exc:
                latency = time.monotonic() - t0
                last = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
                self._record(CallRecord(cfg.model, purpose, 0, 0, 0.0, latency, last), ids)
                if not isinstance(exc, _retryable()) or attempt + 1 >= cfg.max_attempts:
                    raise ProposerError(f"LLM call failed after {attempt + 1} attempt(s): {last}") from None
                delay = cfg.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
                log.warning("LLM call failed (%s); retrying in %.1fs", last, delay)
                self.sleep(delay)
                continue
            latency = time.monotonic() - t0
            pt, ct = _usage(resp)
            choices = getattr(resp, "choices", None) or []
            content = (getattr(getattr(choices[0], "message", None), "content", None) if choices else None) or ""
            self._record(CallRecord(cfg.model, purpose, pt, ct, _cost(resp), latency, None), ids)
            return str(content), ids
        raise ProposerError(f"LLM call failed: {last}")

    def _record(self, rec: CallRecord, ids: list[int]) -> None:
        if self.record_call is None:
            return
        try:
            call_id = self.record_call(rec)
        except Exception:  # accounting must not lose the answer
            log.exception("could not record an LLM call")
            return
        if call_id is not None:
            ids.append(call_id)

    def propose(self, ctx: ProposalContext) -> Proposal:
        purpose = "repair" if ctx.repair_of is not None else "propose"
        text, ids = self.complete(build_messages(ctx), purpose)
        proposal = parse_answer(text, ctx.editable, ctx.head_files)
        proposal.llm_call_ids = ids
        return proposal
