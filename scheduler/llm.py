"""LLM proposer through litellm: any model string, local or hosted.

The prompt holds the program's instructions, the measured noise floor, a compact history of past
experiments of the program (so nothing that failed is forgotten) and the head's editable files. It is
budgeted against the model's context (litellm's model map, or FARM_LLM_CONTEXT_TOKENS): when the
history does not fit, the oldest lines go first, keeps and recent outcomes stay. The answer format is
a DESCRIPTION line, a RATIONALE and SEARCH/REPLACE blocks (or whole files after `FILE: name`, offered
only when a file fits in max_tokens); a unified diff is read too. Parsing never raises: an answer with no usable
edit becomes a proposal with an empty edit, which record_proposal stores as `invalid` with its reason.

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
from functools import lru_cache
from typing import Any

from farm.candidates import Edit
from farm.settings import Settings
from scheduler.proposers import HistoryItem, Proposal, ProposalContext, ProposerError, ProposerRefused

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 400_000
MAX_HISTORY_LINES = 400
# a model litellm does not know (most local servers) and no FARM_LLM_CONTEXT_TOKENS: a common local size
DEFAULT_CONTEXT_TOKENS = 32_768
# what an answer needs besides a whole file: DESCRIPTION, RATIONALE, the FILE line and the fence
ANSWER_OVERHEAD_TOKENS = 300
# contexts learned from a server's "maximum context length is N tokens" refusal, by (model, api_base): a model
# litellm does not know need not fail every call before FARM_LLM_CONTEXT_TOKENS is set
_learned_context: dict[tuple[str, str | None], int] = {}
_DIGITS = re.compile(r"[0-9]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_CONTEXT_SIZE = re.compile(r"(?:maximum context length is|context window of|context length of)\D{0,12}(\d{3,8})",
                           re.I)


def estimate_tokens(text: str) -> int:
    """A conservative token count with no tokenizer. SmolLM2's tokenizer (49k entries, the smallest we serve)
    reads train.py at 3.0 characters a token and history lines at 2.4, since it gives every digit a token:
    counting a token per digit and per 3 other characters overestimates both by 1-9 %, larger vocabularies more.
    Outside ASCII a character is counted as its UTF-8 bytes, a byte-level tokenizer's worst case: at 3 characters a
    token, Chinese instructions were counted at a third of what a tokenizer gives (found by review)."""
    digits = len(_DIGITS.findall(text))
    wide = _NON_ASCII.findall(text)
    wide_chars = sum(len(w) for w in wide)
    wide_bytes = sum(len(w.encode("utf-8", "surrogatepass")) for w in wide)
    return (len(text) - digits - wide_chars) // 3 + digits + wide_bytes + 1


@lru_cache(maxsize=64)
def model_context_tokens(model: str) -> int | None:
    """The model's context window from litellm's model map, or None for a model it does not know."""
    import litellm

    try:
        info = litellm.get_model_info(model)
    except Exception:  # not mapped: a local or new model
        return None
    n = info.get("max_input_tokens")
    return int(n) if n else None


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
    context_tokens: int = 0  # 0: litellm's model map, else DEFAULT_CONTEXT_TOKENS

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
            context_tokens=int(proposer.get("context_tokens", settings.llm_context_tokens)),
        )

    def context_window(self) -> int:
        """The setting, else the model map, else the default; a smaller window a server named when it refused a
        prompt wins over any of them (a setting larger than the server's context failed every call once: found by
        review)."""
        stated = self.context_tokens or model_context_tokens(self.model) or DEFAULT_CONTEXT_TOKENS
        learned = _learned_context.get((self.model, self.api_base))
        return min(stated, learned) if learned else stated

    def prompt_budget(self, context: int | None = None) -> int:
        """Tokens the prompt may take: the context less the answer's max_tokens and a margin for the chat
        template's markup (role tokens, a server's own system text)."""
        window = context or self.context_window()
        return window - self.max_tokens - (128 + window // 64)


_SYSTEM = """You are a machine-learning researcher improving a small GPT training script.
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
{whole_file}Only the editable files may change. Do not add dependencies."""
_WHOLE_FILE = "Instead of blocks you may give a whole file as `FILE: <name>` followed by a fenced code block.\n"


def system_prompt(*, whole_files: bool = True) -> str:
    return _SYSTEM.format(whole_file=_WHOLE_FILE if whole_files else "")


def _fmt_item(h: HistoryItem) -> str:
    val = f"{h.val_bpb:.6f}" if h.val_bpb is not None else "-"
    delta = f"{h.delta:+.6f}" if h.delta is not None else ""
    reason = f" | {' '.join(h.reason.split())[:160]}" if h.reason and h.status not in ("keep",) else ""
    desc = " ".join(h.description.split())[:140]
    return f"#{h.experiment_id} [{h.status}] {val} {delta} {desc}{reason}".replace("  ", " ")


def history_text(history: list[HistoryItem], budget: int | None = None,
                 max_lines: int = MAX_HISTORY_LINES) -> str:
    """The history lines, oldest first, within `budget` tokens (estimated; None: no limit) and `max_lines`
    recent lines. What does not fit goes oldest first: keeps (the head's lineage, its best results) are chosen
    first, newest first, with up to half the budget, then the most recent lines of any outcome, so recent
    failures are not tried again; the omitted are summarised by count."""
    if not history:
        return "(no experiments yet)"
    lines = [_fmt_item(h) for h in history]
    cost = [estimate_tokens(ln) + 1 for ln in lines]
    left = budget if budget is not None else sum(cost)
    chosen: set[int] = set()
    keep_left = left // 2 if budget is not None else left
    for i in reversed(range(len(lines))):
        if history[i].status == "keep" and cost[i] <= keep_left:
            chosen.add(i)
            keep_left -= cost[i]
            left -= cost[i]
    recent = 0
    for i in reversed(range(len(lines))):
        if recent >= max_lines:
            break
        if i not in chosen:
            if cost[i] > left:
                break
            chosen.add(i)
            left -= cost[i]
        recent += 1
    omitted = len(lines) - len(chosen)
    shown = [lines[i] for i in sorted(chosen)]
    if omitted:
        return "\n".join([f"({omitted} older experiments omitted; keeps and the most recent follow)", *shown])
    return "\n".join(shown)


def build_messages(ctx: ProposalContext, *, budget: int | None = None, max_tokens: int | None = None,
                   history_budget: int | None = None) -> list[dict[str, str]]:
    """The chat messages for a proposal. `budget`: the tokens the prompt may take (None: no limit), filled by
    history after everything else; `history_budget` caps the history alone. `max_tokens`: the answer's limit,
    which decides whether a whole file may be asked for (None: it may)."""
    return _build(ctx, budget=budget, max_tokens=max_tokens, history_budget=history_budget)[0]


def _build(ctx: ProposalContext, *, budget: int | None, max_tokens: int | None,
           history_budget: int | None) -> tuple[list[dict[str, str]], int]:
    """The messages and the tokens (estimated) their history takes."""
    noise = (f"Measured noise floor: sigma = {ctx.sigma:.6f} bpb between seeds of identical code."
             if ctx.sigma is not None else "Noise floor: not measured yet.")
    head = f"Current head val_bpb: {ctx.head_val_bpb:.6f}." if ctx.head_val_bpb is not None else ""
    files = "\n\n".join(f"{name}\n```python\n{text}\n```" for name, text in ctx.head_files.items())
    # train.py alone is about 6.8k tokens: with the default max_tokens of 4096 a whole-file answer is always cut
    # off, and was stored invalid with no word of why
    whole = max_tokens is None or all(estimate_tokens(ctx.head_files.get(n, "")) + ANSWER_OVERHEAD_TOKENS
                                      <= max_tokens for n in ctx.editable)
    system = system_prompt(whole_files=whole)
    before = [f"# Research program\n{ctx.instructions.strip()}",
              f"# Status\n{noise} {head}\nEditable files: {', '.join(ctx.editable)}."]
    title = "# History (id [outcome] val_bpb improvement-vs-parent description | reason)\n"
    after = []
    if ctx.repair_of is not None:
        after.append(f"# Repair\nExperiment #{ctx.repair_of} crashed. Fix the bug while keeping its idea. "
                     f"Its change was:\n```diff\n{ctx.repair_diff[-6000:]}\n```\n"
                     f"The end of its log:\n```\n{ctx.repair_log[-4000:]}\n```\n"
                     "The files below are the crashed version; edit them.")
    after.append(f"# Current files\n{files}")
    room: int | None = None
    if budget is not None:
        fixed = estimate_tokens(system) + estimate_tokens("\n\n".join([*before, title, *after]))
        # the files alone may not fit (SmolLM2's 8k context): send them with no history and let the server say
        room = max(0, budget - fixed)
    if history_budget is not None:
        room = history_budget if room is None else min(room, history_budget)
    hist = history_text(ctx.history, room)
    parts = [*before, title + hist, *after]
    return ([{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}],
            estimate_tokens(hist))


# A label's leading markup (`**`, `#`, `- `) is `[^\w\n]*`, never `\W*`: that crosses newlines, so at every line
# start it ran to the end of a run of markup-only lines and an answer of 8k `-` lines took 4 s (quadratic).
_DESC = re.compile(r"^[^\w\n]*description\W*:\s*(?P<d>.+)$", re.I | re.M)
_RAT = re.compile(r"^[^\w\n]*rationale\W*:\s*(?P<r>.+?)"
                  r"(?=\n\s*\n|\n[^\w\n]*edits\W*:|\n[^\n]*\n?<{5,9} SEARCH|\Z)", re.I | re.M | re.S)
_EDITS = re.compile(r"^[^\w\n]*edits\W*:\s*$", re.I | re.M)
_FILE = re.compile(r"^[^\w\n]*FILE\W*:\s*`?(?P<name>[\w./-]+)`?\s*\n```[\w+-]*\n(?P<body>.*?)\n```",
                   re.M | re.S)
_FENCE = re.compile(r"```[\w+-]*\n(?P<body>.*?)\n```", re.S)


# A unified diff: in a ```diff fence, or bare from its first `--- a/x` / `+++ b/x` / `@@` header (or the `diff --git`
# line before it) to a closing fence or the end. record_proposal applies one, but such an answer was read as no edit,
# or its fence as the whole file (found by review).
_DIFF_FENCE = re.compile(r"^```(?:diff|patch)[ \t]*\n(?P<body>.*?)(?:\n```|\Z)", re.M | re.S)
_DIFF_HEAD = re.compile(r"^(?:diff --git [^\n]*\n(?:[^\n]*\n){0,4}?)?--- [^\n]*\n\+\+\+ [^\n]*\n@@", re.M)
_SEARCH_LINE = re.compile(r"^[ \t]*<{5,9} SEARCH\b", re.M)


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    """The text less the spans (which do not overlap)."""
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + text[end:]
    return text


def _unified_diff(text: str) -> str | None:
    """The unified diff the answer gives, or None."""
    fence = _DIFF_FENCE.search(text)
    if fence is not None and fence.group("body").strip():
        return fence.group("body") + "\n"
    head = _DIFF_HEAD.search(text)
    if head is None:
        return None
    rest = text[head.start():]
    close = re.search(r"^```[ \t]*$", rest, re.M)
    return (rest[:close.start()] if close else rest).rstrip("\n") + "\n"


def parse_answer(text: str, editable: list[str], current: dict[str, str]) -> Proposal:
    """Description, rationale and edit from a model's answer; an unusable answer gives an empty edit."""
    # before anything else (found by review): a lone surrogate ("\ud83d", half an emoji) cannot be encoded, so the
    # experiment's insert failed and the paid call was left linked to nothing; CRLF line ends left a file of mixed
    # line ends, and a whole file answered in CRLF was not read at all
    raw = (text or "").encode("utf-8", "replace").decode("utf-8").replace("\x00", "")  # Postgres text holds no NUL
    text = raw[:MAX_ANSWER_CHARS].replace("\r\n", "\n")
    # the labels are read only before the first block, and only the first of each: a line of code in a block that
    # looks like a label (`description: ...`) was removed from the block (found by review)
    first = _SEARCH_LINE.search(text)
    head_end = first.start() if first else len(text)
    m, r = (x if x is not None and x.end() <= head_end else None for x in (_DESC.search(text), _RAT.search(text)))
    if m:
        description = m.group("d").strip()
    else:
        description = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(
            ("```", "<<<<<<<", "=======", ">>>>>>>"))), "")
    description = " ".join(description.split())[:200] or "(no description)"
    rationale = " ".join(r.group("r").split())[:2000] if r else ""
    edit = Edit()
    if "<<<<<<< SEARCH" in text or ">>>>>>> REPLACE" in text:
        em = _EDITS.search(text, 0, head_end)
        if em:
            body = text[em.end():]
        else:
            # drop the DESCRIPTION / RATIONALE lines so they cannot be read as a file name
            body = _without(text, [(x.start(), x.end()) for x in (m, r) if x is not None])
        edit = Edit(search_replace=body.strip("\n"))
    else:
        files = {fm.group("name"): fm.group("body") + "\n" for fm in _FILE.finditer(text)}
        diff = None if files else _unified_diff(text)
        if not files and diff is None and len(editable) == 1:
            # a single fenced block that looks like the whole file
            only = editable[0]
            blocks = [b.group("body") for b in _FENCE.finditer(text)]
            if blocks:
                best = max(blocks, key=len)
                if len(best) >= 0.5 * len(current.get(only, "")):
                    files = {only: best + "\n"}
        if files:
            edit = Edit(files=files)
        elif diff is not None:
            edit = Edit(unified_diff=diff)
    return Proposal(description=description, rationale=rationale, edit=edit, raw=raw)


# statuses worth another attempt whatever exception litellm maps them to: 529 (a provider's "overloaded") came back
# as a plain APIError and failed the proposal on its first attempt (found by review)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
# statuses of a call that no attempt will change (a bad key, a model the provider does not have): a program whose
# calls meet them several times in a row is paused with the reason (scheduler/loop.py)
REFUSED_STATUS = frozenset({401, 403, 404})


def _retryable(exc: BaseException) -> bool:
    from litellm import exceptions as ex

    return isinstance(exc, (ex.RateLimitError, ex.Timeout, ex.APIConnectionError, ex.ServiceUnavailableError,
                            ex.InternalServerError, ex.BadGatewayError)) or getattr(exc, "status_code", None) in RETRY_STATUS


class ContextOverflow(ProposerError):
    """The prompt did not fit the model's context. `context`: the window the server named, if it did."""

    def __init__(self, message: str, call_ids: list[int], context: int | None) -> None:
        super().__init__(message)
        self.call_ids = call_ids
        self.context = context


def _overflow(exc: Exception) -> bool:
    from litellm import exceptions as ex

    return isinstance(exc, ex.ContextWindowExceededError) or (
        isinstance(exc, ex.BadRequestError) and bool(_CONTEXT_SIZE.search(str(exc))))


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

    def complete(self, messages: list[dict[str, str]], purpose: str = "propose") -> tuple[str, list[int], str]:
        """The answer text, with retries; the ids of the recorded calls; the finish reason ("length": cut off
        at max_tokens). ProposerError when all attempts fail, ContextOverflow when the prompt is too long."""
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
                if _overflow(exc):  # the same prompt fails the same way every time: no backoff
                    m = _CONTEXT_SIZE.search(str(exc))
                    raise ContextOverflow(f"LLM call failed: {last}", ids, int(m.group(1)) if m else None) from None
                if getattr(exc, "status_code", None) in REFUSED_STATUS:
                    raise ProposerRefused(f"LLM call refused: {last}") from None
                if not _retryable(exc) or attempt + 1 >= cfg.max_attempts:
                    raise ProposerError(f"LLM call failed after {attempt + 1} attempt(s): {last}") from None
                delay = cfg.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
                log.warning("LLM call failed (%s); retrying in %.1fs", last, delay)
                self.sleep(delay)
                continue
            latency = time.monotonic() - t0
            pt, ct = _usage(resp)
            choices = getattr(resp, "choices", None) or []
            content = (getattr(getattr(choices[0], "message", None), "content", None) if choices else None) or ""
            finish = str((getattr(choices[0], "finish_reason", None) if choices else None) or "")
            self._record(CallRecord(cfg.model, purpose, pt, ct, _cost(resp), latency, None), ids)
            return str(content), ids, finish
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
        cfg = self.config
        purpose = "repair" if ctx.repair_of is not None else "propose"
        messages, used = _build(ctx, budget=cfg.prompt_budget(), max_tokens=cfg.max_tokens, history_budget=None)
        try:
            text, ids, finish = self.complete(messages, purpose)
        except ContextOverflow as exc:
            # our estimate or the context we assumed was wrong: once more with half the history, in the
            # context the server named (kept for later calls). Left alone, every later call failed the same way
            # and the program stayed active forever, proposing nothing
            budget = cfg.prompt_budget()
            if exc.context:
                _learned_context[(cfg.model, cfg.api_base)] = exc.context
                budget = min(budget, cfg.prompt_budget(exc.context))
            log.warning("program %d: prompt too long for %s; retrying with half its history", ctx.program_id,
                        cfg.model)
            messages, _ = _build(ctx, budget=budget, max_tokens=cfg.max_tokens, history_budget=used // 2)
            try:
                text, later, finish = self.complete(messages, purpose)
            except ContextOverflow as again:
                raise ProposerError(str(again)) from None
            ids = exc.call_ids + later
        proposal = parse_answer(text, ctx.editable, ctx.head_files)
        proposal.llm_call_ids = ids
        if finish == "length":
            proposal.defect = f"the answer was cut off at max_tokens={cfg.max_tokens}"
        elif finish not in ("stop", ""):
            # a content filter's empty answer was stored as "the proposal contains no edit" (found by review)
            proposal.defect = f"the answer ended with finish_reason={finish!r}, not 'stop'"
        return proposal
