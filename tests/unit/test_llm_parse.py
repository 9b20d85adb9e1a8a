"""Parsing a model's answer (scheduler.llm.parse_answer) without a model: labels, and time on hostile answers."""

from __future__ import annotations

import time

import pytest

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
