"""Parsing a model's answer (scheduler.llm.parse_answer) without a model: labels, and time on hostile answers."""

from __future__ import annotations

import time

import pytest

from farm.candidates import check_edit
from scheduler.llm import parse_answer

CURRENT = {"train.py": "LR = 0.1\nDEPTH = 4\n"}
BLOCK = "train.py\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"


def test_labels_with_markdown_markup_are_read() -> None:
    text = f"**DESCRIPTION**: deeper model\n## Rationale: more layers\nmore capacity\n\n- EDITS:\n{BLOCK}"
    p = parse_answer(text, ["train.py"], CURRENT)
    assert p.description == "deeper model"
    assert p.rationale == "more layers more capacity"
    assert p.edit.search_replace == BLOCK.strip("\n")
    p = parse_answer("DESCRIPTION: whole file\n**FILE**: `train.py`\n```python\nLR = 0.2\n```\n", ["train.py"], CURRENT)
    assert p.edit.files == {"train.py": "LR = 0.2\n"}


@pytest.mark.parametrize("answer", [
    "-\n" * 50_000,
    "RATIONALE: x\n" + "-\n" * 50_000,
    "DESCRIPTION: d\nRATIONALE: x\n" + "-\n" * 50_000 + BLOCK,
    "** \n" * 50_000 + "FILE: train.py\n",
])
def test_an_answer_of_many_markup_lines_parses_in_linear_time(answer: str) -> None:
    # `^\W*` crossed newlines, so each line start scanned every markup line after it: 4 s at 8k lines (the
    # scheduler's pass, holding the GIL, froze meanwhile) and minutes at 50k. Linear, this takes milliseconds.
    t0 = time.perf_counter()
    parse_answer(answer, ["train.py"], CURRENT)
    assert time.perf_counter() - t0 < 2.0


def test_a_lone_surrogate_is_replaced_before_anything_else() -> None:
    """Found by review: a lone surrogate (half an emoji) cannot be encoded, so inserting the experiment failed and the
    paid LLM call was left linked to nothing."""
    new = "LR = 0.2  # \ud83d\n"
    for answer in (f"DESCRIPTION: faster \ud83d warmup\nRATIONALE: r \udc00\n{BLOCK}",
                   f"DESCRIPTION: faster \ud83d warmup\nFILE: train.py\n```python\n{new}```\n"):
        p = parse_answer(answer, ["train.py"], CURRENT)
        for text in (p.description, p.rationale, p.raw, p.edit.search_replace or "", *p.edit.files.values()):
            text.encode("utf-8")  # what the database does
        assert p.description == "faster ? warmup"
    assert parse_answer(f"DESCRIPTION: d\nFILE: train.py\n```python\n{new}```\n", ["train.py"], CURRENT).edit.files == {
        "train.py": "LR = 0.2  # ?\n"}


def test_code_that_looks_like_a_label_stays_in_its_block() -> None:
    """Found by review: in an answer without an `EDITS:` line, every line of a block that looked like a label
    (`"description": ...`, `rationale: ...`) was deleted from it."""
    replace = 'DEPTH = 5\nRUN = {\n    "description": "deeper",\n    rationale: 1,\n}'
    answer = (f"DESCRIPTION: deeper\nRATIONALE: more layers\n\ntrain.py\n<<<<<<< SEARCH\nDEPTH = 4\n=======\n{replace}\n"
              ">>>>>>> REPLACE\n")
    p = parse_answer(answer, ["train.py"], CURRENT)
    assert p.description == "deeper" and p.rationale == "more layers"
    assert p.edit.search_replace == f"train.py\n<<<<<<< SEARCH\nDEPTH = 4\n=======\n{replace}\n>>>>>>> REPLACE"
    # with no label before the block, one inside it is no label
    p = parse_answer(f"train.py\n<<<<<<< SEARCH\nDEPTH = 4\n=======\n{replace}\n>>>>>>> REPLACE\n", ["train.py"],
                     CURRENT)
    assert p.description == "train.py" and p.rationale == "" and f"\n{replace}\n" in (p.edit.search_replace or "")


def test_an_answer_with_crlf_line_ends_gives_lf_files() -> None:
    """Found by review: a CRLF answer's blocks left a file of mixed line ends, and a whole file in CRLF was not read."""
    answer = f"DESCRIPTION: deeper\nRATIONALE: r\nEDITS:\n{BLOCK}".replace("\n", "\r\n")
    p = parse_answer(answer, ["train.py"], CURRENT)
    assert p.description == "deeper"
    assert check_edit(CURRENT, p.edit, ["train.py"]).files == {"train.py": "LR = 0.1\nDEPTH = 5\n"}
    whole = "DESCRIPTION: d\r\nFILE: train.py\r\n```python\r\nLR = 0.2\r\nDEPTH = 4\r\n```\r\n"
    assert parse_answer(whole, ["train.py"], CURRENT).edit.files == {"train.py": "LR = 0.2\nDEPTH = 4\n"}


@pytest.mark.parametrize("wrap", ["```diff\n{}```\n", "Here it is:\n{}\nThat is all.\n", "```\n{}```\n",
                                  "diff --git a/train.py b/train.py\nindex 1..2 100644\n{}"])
def test_a_unified_diff_answer_is_read_as_one(wrap: str) -> None:
    """Found by review: record_proposal applies a unified diff, but an answer giving one was read as no edit (or its
    fence as the whole file, which did not compile)."""
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,2 @@\n LR = 0.1\n-DEPTH = 4\n+DEPTH = 5\n"
    p = parse_answer("DESCRIPTION: deeper\nRATIONALE: r\n" + wrap.format(diff), ["train.py"], CURRENT)
    assert p.description == "deeper" and p.edit.unified_diff and not p.edit.files
    checked = check_edit(CURRENT, p.edit, ["train.py"])
    assert checked.reason is None and checked.files == {"train.py": "LR = 0.1\nDEPTH = 5\n"}


@pytest.mark.parametrize("filler", [" " * 200_000, "`" * 200_000, "\n \n" * 50_000, "<" * 200_000])
def test_an_answer_with_a_long_line_parses_and_checks_in_linear_time(filler: str) -> None:
    # found by review: the SEARCH/REPLACE parse took 7 s at 16k spaces (minutes at 200k) holding the GIL; linear,
    # milliseconds. The bound is loose so a busy machine cannot fail it.
    t0 = time.perf_counter()
    for answer in (f"DESCRIPTION: d\nRATIONALE: r\n{BLOCK}{filler}\n", f"DESCRIPTION: d\n{filler}\nEDITS:\n{BLOCK}"):
        p = parse_answer(answer, ["train.py"], CURRENT)
        check_edit(CURRENT, p.edit, ["train.py"])
    assert time.perf_counter() - t0 < 5.0
