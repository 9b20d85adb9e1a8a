"""Offline proposer: perturb the UPPER_CASE hyperparameters of train.py.

A real search baseline that needs no LLM, going through the same validation and policy as every
other proposal. It reads top-level lines of the form

    NAME = 0.04  # comment
    NAME = pick(h100=0.04, cpu=0.02)  # comment     (the value of the program's profile is perturbed)

and changes one (sometimes two) of them by name-aware rules: learning rates by factors, depth by
+-1, batch sizes by powers of two, ratios and fractions within [0, 1] (a *_RATIO above 1, such as
ASPECT_RATIO, is an ordinary number) by steps clamped to [0, 1], warm-up and step counts as ordinary
numbers, other numbers by small factors. An integer stays an integer; a draw that rounds to no change
(or a positive value to 0) is no proposal. Strings, booleans, seeds and settings that do not change
training (LOG_EVERY only prints) are left alone. Only the value text changes, so the rest of the line
(comment, other profiles) stays byte-identical.
"""

from __future__ import annotations

import ast
import random
import re
import threading
from dataclasses import dataclass

from farm.candidates import Edit, content_hash
from scheduler.proposers import Proposal, ProposalContext, ProposerError

_LINE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)\s*=\s*(?P<rhs>[^#\n]+?)\s*(?P<comment>#.*)?$")
# LOG_EVERY only sets how often train.py prints: a run spent on it measures nothing but noise
SKIP = ("SEED", "VOCAB", "SEQ_LEN", "TIME_BUDGET", "EVAL", "LOG_EVERY")


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    line: int  # 0-based line index
    start: int  # column span of the perturbed value text
    end: int
    value: float | int

    @property
    def is_int(self) -> bool:
        return isinstance(self.value, int)


def _number(node: ast.expr) -> float | int | None:
    """A numeric literal or simple arithmetic of literals (2**19, 6e-4, -1), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _number(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow | ast.Mult | ast.Div | ast.Add | ast.Sub):
        a, b = _number(node.left), _number(node.right)
        if a is None or b is None:
            return None
        try:
            if isinstance(node.op, ast.Pow):
                return a ** b if abs(b) < 64 else None
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.Div):
                return a / b
            return a + b if isinstance(node.op, ast.Add) else a - b
        except (ZeroDivisionError, OverflowError):
            return None
    return None


def find_hyperparameters(source: str, profile: str) -> list[Hyperparameter]:
    out: list[Hyperparameter] = []
    for i, line in enumerate(source.splitlines()):
        m = _LINE.match(line)
        if not m or any(s in m.group("name") for s in SKIP):
            continue
        rhs_start = m.start("rhs")
        try:
            expr = ast.parse(m.group("rhs"), mode="eval").body
        except SyntaxError:
            continue
        node: ast.expr | None = expr
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "pick":
            node = next((k.value for k in expr.keywords if k.arg == profile), None)
        if node is None or node.end_col_offset is None:
            continue
        value = _number(node)
        if value is None:
            continue
        out.append(Hyperparameter(m.group("name"), i, rhs_start + node.col_offset,
                                  rhs_start + node.end_col_offset, value))
    return out


def _fmt(value: float | int, is_int: bool) -> str:
    if is_int:
        return str(int(value))
    text = f"{value:.3g}"
    return text if any(c in text for c in ".e") else text + ".0"


def _rule(hp: Hyperparameter, rng: random.Random) -> float | int:
    name, v = hp.name, hp.value
    if "DEPTH" in name or "N_LAYER" in name or name.endswith("LAYERS"):
        return max(1, int(v) + rng.choice((-1, 1)))
    if "BATCH" in name or "TOKENS" in name:
        new = v * 2 if rng.random() < 0.5 else v / 2
        return max(1, int(new)) if hp.is_int else new
    # a fraction only when it is one: ASPECT_RATIO = 32 or MLP_RATIO = 4 are sizes (clamped to 1 before)
    if ("RATIO" in name or "FRAC" in name) and 0 <= v <= 1:
        step = rng.choice((-0.2, -0.1, 0.1, 0.2))
        return round(min(1.0, max(0.0, float(v) + step)), 3)
    # a step count, whatever else the name says (MUON_MOMENTUM_WARMUP = 30 was capped at 0.999 as a momentum)
    if "WARMUP" in name or "STEPS" in name:
        return _ordinary(hp, rng)
    if "LR" in name or "LEARNING_RATE" in name:
        return float(v) * rng.choice((0.5, 0.7, 1.4, 2.0))
    if "DECAY" in name or "BETA" in name or "MOMENTUM" in name:
        if v == 0:
            return 0.1
        new = float(v) * rng.choice((0.8, 1.25))
        return min(new, 0.999) if ("BETA" in name or "MOMENTUM" in name) else new
    return _ordinary(hp, rng)


def _ordinary(hp: Hyperparameter, rng: random.Random) -> float | int:
    v = hp.value
    if hp.is_int:
        if abs(v) >= 8:
            return int(v) * 2 if rng.random() < 0.5 else max(1, int(v) // 2)
        return max(0, int(v) + rng.choice((-1, 1)))
    return float(v) * rng.choice((0.8, 1.25))


def perturb(hp: Hyperparameter, rng: random.Random) -> float | int | None:
    """The new value as it will be written (an int stays an int), or None when that is no change or
    rounding took it out of range (a positive value at 0): "WEIGHT_DECAY 0 -> 0" was proposed before."""
    raw = _rule(hp, rng)
    new = round(raw) if hp.is_int else float(_fmt(raw, False))
    if new == hp.value or (raw > 0 and new <= 0):
        return None
    return new


def mutate(source: str, profile: str, rng: random.Random, *, n_changes: int = 1) -> tuple[str, str]:
    """(new source, description) with `n_changes` hyperparameters perturbed."""
    params = find_hyperparameters(source, profile)
    if not params:
        raise ProposerError("train.py has no UPPER_CASE numeric hyperparameter to perturb")
    lines = source.splitlines(keepends=True)
    changes = []
    for hp in rng.sample(params, min(n_changes, len(params))):
        new = perturb(hp, rng)
        if new is None or new == hp.value:
            continue
        text = _fmt(new, hp.is_int)
        line = lines[hp.line]
        lines[hp.line] = line[:hp.start] + text + line[hp.end:]
        changes.append(f"{hp.name} {line[hp.start:hp.end]} -> {text}")
    if not changes:
        raise ProposerError("no perturbation changed a value")
    return "".join(lines), "; ".join(changes)


class MutationProposer:
    kind = "mutation"
    inline = True

    # Calls per context, for every proposer object: the scheduler makes a new one per call, and a ProposerError adds
    # no experiment, so the next call has the same context (same seed). Seeded from the context alone, every retry
    # repeated the same draws; once the 56 single-change neighbours of the template were known, 4.4 % of seeds
    # failed 5 retries of 5 and the program stalled for good. The first call of a context draws as before.
    _calls: dict[str, int] = {}
    _calls_lock = threading.Lock()
    # duplicate draws after which every draw changes two values at once: the single-change neighbours of a head are
    # few (56 for the template) and soon all known; pairs are over a thousand
    escalate_after = 6

    def __init__(self, target: str = "train.py", max_tries: int = 30) -> None:
        self.target = target
        self.max_tries = max_tries

    @classmethod
    def _call_number(cls, key: str) -> int:
        with cls._calls_lock:
            if len(cls._calls) > 4096:  # old contexts never come back: the seed moves with every experiment
                cls._calls.clear()
            n = cls._calls.get(key, 0)
            cls._calls[key] = n + 1
        return n

    def propose(self, ctx: ProposalContext) -> Proposal:
        if self.target not in ctx.head_files:
            raise ProposerError(f"{self.target} is not an editable file of this program")
        key = f"{ctx.program_id}:{ctx.head_commit}:{ctx.seed}"
        call = self._call_number(key)
        rng = random.Random(key if call == 0 else f"{key}:retry{call}")
        source = ctx.head_files[self.target]
        duplicates = 0
        for attempt in range(self.max_tries):
            n_changes = 1 if attempt % 3 else 1 + (rng.random() < 0.3)
            if duplicates >= self.escalate_after:
                n_changes = max(n_changes, 2)
            try:
                new, desc = mutate(source, ctx.profile, rng, n_changes=n_changes)
            except ProposerError:
                # a draw that changed nothing (a value at its clamp): draw again. Letting it escape
                # stalled the program for good, since the seed only moves when an experiment is added
                continue
            files = {**ctx.head_files, self.target: new}
            if content_hash(files) not in ctx.known_hashes:
                return Proposal(description=desc, rationale="random hyperparameter perturbation (mutation proposer)",
                                edit=Edit(files={self.target: new}))
            duplicates += 1
        raise ProposerError(f"no new mutation found in {self.max_tries} tries")
