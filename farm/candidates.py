"""Turning an edit into a candidate: apply it, validate it, and record it before any GPU time.

Every proposer (LLM, mutation, a person's patch through the API, repairs and replays) ends here,
so every candidate is validated the same way: the edit applies; only editable files change; each
Python file compiles; the content is new for the program (exact duplicates never run twice).
An edit that fails any check is stored as an `invalid` experiment with its reason, so the LLM is
shown it next time and nothing failed is forgotten.

Edit formats: SEARCH/REPLACE blocks, a unified diff, or whole files.
"""

from __future__ import annotations

import bisect
import difflib
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.models import Experiment, ExperimentRole, ExperimentStatus, Program
from farm.templates import files_digest

log = logging.getLogger("farm.candidates")

MAX_FILE_BYTES = 512_000


class EditError(ValueError):
    """The edit cannot be applied or breaks a rule; the message is the reason shown to people and LLMs."""


@dataclass
class Edit:
    """What a proposer produced, in any one of the three formats."""

    search_replace: str | None = None
    unified_diff: str | None = None
    files: dict[str, str] = field(default_factory=dict)


# The markers count only as whole lines (surrounding spaces aside): the template's banner comments
# (`# =====...`) hold runs of `=` that an unanchored divider took for the end of SEARCH (found by review)
_OPEN = re.compile(r"<{5,9} SEARCH\b.*")
_DIVIDER = re.compile(r"={5,9}")
_CLOSE = re.compile(r">{5,9} REPLACE\b.*")


def _marker(line: str) -> str | None:
    """The marker a line is: "<" (SEARCH), "=" (the divider), ">" (REPLACE), or None."""
    line = line.strip()
    return ("<" if _OPEN.fullmatch(line) else "=" if _DIVIDER.fullmatch(line)
            else ">" if _CLOSE.fullmatch(line) else None)


_WORD = re.compile(r"[\w./-]+")
# what a word needs to be taken for a file name that is not one of the known files: a path with a source or text
# file's extension, so a block for prepare.py is still refused as "not an editable file"
_PATH = re.compile(r"[\w./-]*[A-Za-z_]\.(?:py|pyi|pyx|cu|cuh|c|cc|cpp|h|hpp|sh|txt|md|json|toml|yaml|yml|cfg|ini)")


def _named_file(line: str, files: Iterable[str]) -> str | None:
    """The file the line before a block names, or None. Only a word that is a known file, or looks like a path,
    counts: the last word of `### File: `train.py``, `train.py (hyperparameters):` or `Here is the change:` was
    taken for a file name, and the block refused as editing a file that is not editable (found by review)."""
    known = set(files)
    words = [w.rstrip(".").removeprefix("./") for w in _WORD.findall(line)]
    bare = re.sub(r"^(?:#+|>|[-*]|\d+\.)?\s*(?:file\s*:)?", "", line.strip(), flags=re.I).strip("`*:'\" ")
    return (next((w for w in reversed(words) if w in known), None)
            or next((w for w in reversed(words) if _PATH.fullmatch(w)), None)
            # a line that is one name alone names a file, whatever it is (`Makefile`, `Dockerfile`): refused if it is
            # not editable, never applied to the default file instead (found by review)
            or (bare if re.fullmatch(r"[\w./-]+", bare) and any(c.isalpha() for c in bare)
                and not line.strip().strip("`*").endswith(":") else None))  # `Changes:` is a label, not a file


def parse_search_replace(text: str, default_file: str | None = None,
                         files: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """(file, search, replace) triples from SEARCH/REPLACE blocks. A block's file is named on the nearest line
    before it (a fence line and blank lines aside) by one of `files` or a path; a block without one edits the
    previous block's file, else `default_file`.

    Read line by line, in time linear in the text: a regex over the whole text backtracked on a long line of
    spaces (7 s at 16k, holding the GIL and so the scheduler's pass; the API takes 500k characters), and a block
    cut off at the end (an answer stopped at max_tokens) was dropped silently, the rest of the change stored
    under a description of all of it (both found by review)."""
    lines = text.split("\n")
    marks = [_marker(line) for line in lines]
    blocks: list[tuple[str, str, str]] = []
    after = 0  # the first line after the previous block
    i = 0
    while i < len(lines):
        if marks[i] == ">":
            raise EditError(f"malformed SEARCH/REPLACE block: the >>>>>>> REPLACE on line {i + 1} closes no "
                            "<<<<<<< SEARCH / =======")
        if marks[i] != "<":
            i += 1
            continue
        n = len(blocks) + 1
        j = i - 1
        while j >= after and (not lines[j].strip() or lines[j].strip().startswith("```")):
            j -= 1
        name = (_named_file(lines[j], files) if j >= after else None) or (blocks[-1][0] if blocks else default_file)
        if not name:
            raise EditError("a SEARCH/REPLACE block does not name its file")
        divider = next((k for k in range(i + 1, len(lines)) if marks[k]), len(lines))
        if divider == len(lines) or marks[divider] != "=":
            raise EditError(f"SEARCH/REPLACE block {n} is incomplete: no ======= after its <<<<<<< SEARCH "
                            "(malformed, or the answer was cut off)")
        end = next((k for k in range(divider + 1, len(lines)) if marks[k] in ("<", ">")), len(lines))
        if end == len(lines) or marks[end] != ">":
            raise EditError(f"SEARCH/REPLACE block {n} is incomplete: no >>>>>>> REPLACE after its ======= "
                            "(malformed, or the answer was cut off)")
        blocks.append((name, "\n".join(lines[i + 1:divider]), "\n".join(lines[divider + 1:end])))
        i = after = end + 1
    return blocks


def _span_ignoring_trailing_space(body: str, search: str) -> tuple[int, int] | None:
    """Where `search` matches `body` once when each line's trailing whitespace is ignored (a common LLM slip), as a
    span of `body` itself: the lines around it stay byte for byte. Replacing in a copy of the file stripped of
    all trailing whitespace rewrote every line of it, inside triple-quoted strings too (found by review)."""
    lines = body.split("\n")
    stripped = [line.rstrip() for line in lines]
    hay = "\n".join(stripped)
    needle = "\n".join(line.rstrip() for line in search.split("\n"))
    pos = hay.find(needle)
    if pos < 0 or hay.find(needle, pos + 1) >= 0:
        return None
    starts, starts_stripped = [0], [0]  # where each line begins in body, and in hay
    for line, short in zip(lines, stripped, strict=True):
        starts.append(starts[-1] + len(line) + 1)
        starts_stripped.append(starts_stripped[-1] + len(short) + 1)

    def at(p: int) -> tuple[int, int]:  # (line, column) of a position in hay
        n = bisect.bisect_right(starts_stripped, p) - 1
        return n, p - starts_stripped[n]

    (first, col), (last, end) = at(pos), at(pos + len(needle))
    if end and end == len(stripped[last]):
        end = len(lines[last])  # the match ends a line: its trailing whitespace goes with it
    return starts[first] + col, starts[last] + end


def apply_search_replace(base: dict[str, str], text: str, default_file: str | None = None) -> dict[str, str]:
    blocks = parse_search_replace(text, default_file, files=base)
    if not blocks:
        raise EditError("no SEARCH/REPLACE block found")
    out = dict(base)
    for i, (name, search, replace) in enumerate(blocks, 1):
        if name not in out:
            raise EditError(f"block {i} edits {name!r}, which is not an editable file")
        body = out[name]
        if search.strip() == "":
            raise EditError(f"block {i} has an empty SEARCH section")
        count = body.count(search)
        if count > 1:
            raise EditError(f"block {i}: SEARCH text matches {count} places in {name}; include more context")
        if count == 1:
            out[name] = body.replace(search, replace, 1)
            continue
        span = _span_ignoring_trailing_space(body, search)
        if span is None:
            raise EditError(f"block {i}: SEARCH text not found in {name}")
        out[name] = body[:span[0]] + replace + body[span[1]:]
    return out


_PATCH_PATH_LINE = re.compile(r"^(?:diff --git |(?:rename|copy) (?:from|to) )(?P<rest>.*)$")
_OLD_NEW_PATH_LINE = re.compile(r"^(?:--- |\+\+\+ )(?P<rest>.*)$")


def _patch_paths(diff: str) -> Iterator[str]:
    """What the patch's header lines name. A `--- x` / `+++ y` pair is a file's header only when a hunk header
    (`@@`) follows it: inside a hunk, a removed line `-- /x` next to an added `++ ../y` is content."""
    lines = diff.splitlines()
    for i, line in enumerate(lines):
        m = _PATCH_PATH_LINE.match(line)
        if m is None and (m := _OLD_NEW_PATH_LINE.match(line)) is not None:
            first = i if line.startswith("--- ") else i - 1
            if not (first >= 0 and first + 2 < len(lines) and lines[first].startswith("--- ")
                    and lines[first + 1].startswith("+++ ") and lines[first + 2].startswith("@@")):
                continue
        if m is not None:
            yield m.group("rest")


def _unsafe_patch_path(line: str) -> str | None:
    """A path a patch header names that would land outside the scratch folder: absolute, or with a `..`."""
    for word in line.split("\t")[0].split():  # `diff --git a/x b/x` names two; `--- x\tdate` one
        if word == "/dev/null":
            continue
        if word.startswith("/") or ".." in word.replace("\\", "/").split("/"):
            return word
    return None


def apply_unified_diff(base: dict[str, str], diff: str) -> dict[str, str]:
    """Apply a unified diff (git or plain `diff -u` style) with `git apply` in a scratch folder.

    The patch comes from an LLM or over the API, so it is hostile until shown otherwise: a path outside the
    folder (absolute, or through `..`) is refused before `git apply` runs (which refuses them too, without
    `--unsafe-paths`), and the result is read back only as regular files, never through a symbolic link the
    patch made (`new file mode 120000` pointing at a file of the host)."""
    if not diff.strip():
        raise EditError("empty patch")
    for rest in _patch_paths(diff):
        bad = _unsafe_patch_path(rest)
        if bad is not None:
            raise EditError(f"the patch names a path outside the template: {bad[:200]!r}")
    with tempfile.TemporaryDirectory(prefix="farm-apply-") as tmp:
        root = Path(tmp)
        for name, text in base.items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(text.encode("utf-8"))  # bytes both ways: text mode would turn every \r\n and \r into \n
        patch = diff if diff.endswith("\n") else diff + "\n"
        reasons: list[str] = []
        for strip in ("1", "0"):
            r = subprocess.run(["git", "apply", f"-p{strip}", "--recount", "--whitespace=nowarn", "-"],
                               input=patch, cwd=root, capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                break
            reasons.append((r.stderr.strip().splitlines() or ["patch does not apply"])[-1].removeprefix("error: "))
        else:
            # the reason of the strip level whose paths exist: the -p0 try of an a/ b/ patch whose context does not
            # match said "b/train.py: No such file or directory", which named the wrong cause (found by review)
            found = [why for why in reasons
                     if not any(m in why for m in ("No such file", "does not exist", "unable to find filename"))]
            raise EditError(f"patch does not apply: {(found or reasons)[0]}")
        out: dict[str, str] = {}
        for folder, dirs, files in os.walk(root):  # never follows a link
            for entry in sorted(dirs + files):
                p = Path(folder, entry)
                name = p.relative_to(root).as_posix()
                if p.is_symlink():
                    raise EditError(f"the patch makes {name} a symbolic link")
                if entry in files:
                    if not p.is_file():
                        raise EditError(f"the patch makes {name} something other than a file")
                    try:
                        out[name] = p.read_bytes().decode("utf-8")
                    except UnicodeDecodeError:
                        raise EditError(f"the patch leaves {name} not UTF-8 text") from None
        return out


def apply_edit(base: dict[str, str], edit: Edit, default_file: str | None = None) -> dict[str, str]:
    if edit.files:
        out = dict(base)
        out.update(edit.files)
        return out
    if edit.unified_diff:
        return apply_unified_diff(base, edit.unified_diff)
    if edit.search_replace:
        return apply_search_replace(base, edit.search_replace, default_file)
    raise EditError("the proposal contains no edit")


def check_files(base: dict[str, str], new: dict[str, str], editable: list[str]) -> None:
    """Raise EditError unless only editable files changed, each is sane, and Python compiles."""
    changed = {n for n in set(base) | set(new) if base.get(n) != new.get(n)}
    if not changed:
        raise EditError("the edit changes nothing")
    fixed = sorted(changed - set(editable))
    if fixed:
        raise EditError(f"the edit touches non-editable file(s): {', '.join(fixed)}")
    for name in sorted(changed):
        if name not in new:
            raise EditError(f"the edit deletes {name}")
        text = new[name]
        if len(text.encode()) > MAX_FILE_BYTES:
            raise EditError(f"{name} is larger than {MAX_FILE_BYTES} bytes")
        if "\0" in text:
            raise EditError(f"{name} contains a NUL byte")
        if name.endswith(".py"):
            try:
                compile(text, name, "exec", dont_inherit=True)
            except SyntaxError as exc:
                raise EditError(f"{name} does not compile: {exc.msg} (line {exc.lineno})") from None
            except ValueError as exc:
                raise EditError(f"{name} does not compile: {exc}") from None


def content_hash(files: dict[str, str]) -> str:
    return files_digest(files)


def unified_diff(base: dict[str, str], new: dict[str, str]) -> str:
    parts: list[str] = []
    for name in sorted(set(base) | set(new)):
        a, b = base.get(name, ""), new.get(name, "")
        if a != b:
            parts.extend(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                              fromfile=f"a/{name}", tofile=f"b/{name}"))
    text = "".join(parts)
    return text if not text or text.endswith("\n") else text + "\n"


PENDING = -1  # in `known`: stored by the same batch, no id yet


def known_duplicates(session: Session, program_id: int, digests: Iterable[str | None]) -> dict[str, int | None]:
    """find_duplicate for many digests in one query: {digest: the experiment that has it, or None}. A batch passes
    the dict to record_proposal (`known=`), which adds what it stores, so duplicates within the batch are found
    too; a digest not in it is looked up as before."""
    wanted = sorted({d for d in digests if d})
    if not wanted:
        return {}
    found: dict[str, int | None] = dict.fromkeys(wanted)  # asked and not found: None
    rows = session.execute(
        select(Experiment.content_hash, func.min(Experiment.id))
        .where(Experiment.program_id == program_id, Experiment.content_hash.in_(wanted),
               Experiment.replicate_of.is_(None), Experiment.role != ExperimentRole.baseline)
        .group_by(Experiment.content_hash)).all()
    found.update({str(h): int(i) for h, i in rows})
    return found


def find_duplicate(session: Session, program_id: int, digest: str) -> int | None:
    return session.execute(
        select(Experiment.id).where(Experiment.program_id == program_id, Experiment.content_hash == digest,
                                    Experiment.replicate_of.is_(None),
                                    Experiment.role != ExperimentRole.baseline)
    ).scalars().first()


@dataclass(frozen=True)
class Checked:
    """What `check_edit` made of an edit against its base files: no database needed, so the
    scheduler runs it in the thread that got the LLM's answer, off its own pass."""
    base_digest: str  # the base files it was checked against
    files: dict[str, str]  # the editable files after the edit (empty when invalid)
    digest: str | None
    diff: str
    reason: str | None  # why the edit is invalid, or None


def check_edit(base_files: dict[str, str], edit: Edit, editable: list[str]) -> Checked:
    files: dict[str, str] = {}
    digest: str | None = None
    reason: str | None = None
    try:
        new = apply_edit(base_files, edit, default_file=editable[0] if editable else None)
        check_files(base_files, new, editable)
        files = {n: new[n] for n in editable if n in new}
        digest = content_hash(files)
    except EditError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug here must not lose the answer: it is stored invalid, with why
        log.warning("checking an edit failed unexpectedly", exc_info=True)
        files, digest = {}, None
        reason = f"the edit could not be checked: {type(exc).__name__}: {exc}"[:2000]
    diff = unified_diff(base_files, files) if files else (edit.unified_diff or edit.search_replace or "")[:100_000]
    return Checked(files_digest(base_files), files, digest, diff, reason)


def record_proposal(session: Session, program: Program, *, parent_commit: str, base_files: dict[str, str],
                    edit: Edit, proposer_kind: str, description: str, rationale: str = "",
                    seed: int = 0, repair_of: int | None = None,
                    role: ExperimentRole = ExperimentRole.candidate, checked: Checked | None = None,
                    known: dict[str, int | None] | None = None, batch: bool = False,
                    defect: str | None = None, remeasures: int | None = None) -> Experiment:
    """Validate an edit against `base_files` and store it as `proposed` (valid) or `invalid` (with reason).

    Never raises for a bad edit: the reason lands in `status_reason`. The caller commits; a valid
    proposal is then committed to git and queued by the scheduler. `checked`, when given, is
    `check_edit` of the same edit, done earlier (it is redone if it was made against other files).
    `known`: known_duplicates of a batch (no query here). `batch`: only add the row (no savepoint, no flush):
    the caller flushes the batch at once, and a duplicate that raced in raises IntegrityError there.
    `defect`: what was wrong with the answer besides its edit (an LLM answer cut off at max_tokens); it leads the
    reason of an edit found invalid, which alone would say only "the proposal contains no edit".
    `remeasures`: the experiment whose very files this one runs again on another parent (a replay of a change that
    held the kept one, X+Y replayed onto X): not a duplicate of it, and stored without a content hash, which that
    experiment keeps for the duplicate check (found by review: refused as its duplicate, the better change was lost,
    and proposing Y again on the new head was refused as a duplicate of X+Y for ever).
    """
    editable = list(program.editable_files)
    if checked is None or checked.base_digest != files_digest(base_files):
        checked = check_edit(base_files, edit, editable)
    files, digest, reason = checked.files, checked.digest, checked.reason
    if reason is not None and defect:
        reason = f"{defect}; {reason}"
    if reason is None and digest is not None:
        dup = known[digest] if known is not None and digest in known else find_duplicate(session, program.id, digest)
        if dup == PENDING:
            reason = "duplicate of another proposal stored with it"
        elif dup is not None and dup != remeasures:
            reason = f"duplicate of experiment {dup}"
        elif dup is not None:
            digest = None
    exp = Experiment(program_id=program.id, role=role, parent_commit=parent_commit, files=files,
                     diff=checked.diff,
                     content_hash=None if reason else digest, proposer_kind=proposer_kind,
                     description=(description or "").strip()[:2000] or "(no description)",
                     rationale=(rationale or "").strip()[:8000], seed=seed, repair_of=repair_of,
                     hw_class=program.hw_class,
                     status=ExperimentStatus.invalid if reason else ExperimentStatus.proposed,
                     status_reason=reason)
    if batch:
        session.add(exp)
        if known is not None and exp.content_hash:
            known[exp.content_hash] = PENDING  # stored by this batch: a later edit with this content is a duplicate
        return exp
    try:
        with session.begin_nested():
            session.add(exp)
            session.flush()
    except IntegrityError:  # another process stored the same content a moment ago
        dup = find_duplicate(session, program.id, digest or "")
        exp = Experiment(program_id=program.id, role=role, parent_commit=parent_commit, files={},
                         diff=exp.diff, content_hash=None, proposer_kind=proposer_kind,
                         description=exp.description, rationale=exp.rationale, seed=seed, repair_of=repair_of,
                         hw_class=program.hw_class, status=ExperimentStatus.invalid,
                         status_reason=f"duplicate of experiment {dup}")
        session.add(exp)
        session.flush()
    return exp
