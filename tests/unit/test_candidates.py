from __future__ import annotations

import time
from pathlib import Path

import pytest

from farm.candidates import (
    Edit,
    EditError,
    apply_edit,
    apply_search_replace,
    apply_unified_diff,
    check_edit,
    check_files,
    content_hash,
    parse_search_replace,
    unified_diff,
)

BASE = {"train.py": "LR = 0.1  # learning rate\nDEPTH = 4\n\nprint(LR, DEPTH)\n"}


def test_search_replace_applies():
    text = "train.py\n<<<<<<< SEARCH\nLR = 0.1  # learning rate\n=======\nLR = 0.2  # learning rate\n>>>>>>> REPLACE\n"
    out = apply_search_replace(BASE, text)
    assert out["train.py"].startswith("LR = 0.2")


def test_search_replace_in_code_fence_and_default_file():
    text = "```python\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n```"
    assert "DEPTH = 5" in apply_search_replace(BASE, text, default_file="train.py")["train.py"]


@pytest.mark.parametrize("text,msg", [
    ("train.py\n<<<<<<< SEARCH\nnope\n=======\nx\n>>>>>>> REPLACE", "not found"),
    ("prepare.py\n<<<<<<< SEARCH\nLR\n=======\nx\n>>>>>>> REPLACE", "not an editable file"),
    ("<<<<<<< SEARCH\nLR = 0.1\n>>>>>>> REPLACE", "malformed"),
    ("just prose, no edits", "no SEARCH/REPLACE"),
])
def test_search_replace_errors(text, msg):
    with pytest.raises(EditError, match=msg):
        apply_search_replace(BASE, text, default_file="train.py")


def test_ambiguous_search_refused():
    base = {"train.py": "x = 1\nx = 1\n"}
    with pytest.raises(EditError, match="matches 2 places"):
        apply_search_replace(base, "train.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE")


def test_unified_diff_roundtrip():
    new = {"train.py": BASE["train.py"].replace("DEPTH = 4", "DEPTH = 6")}
    diff = unified_diff(BASE, new)
    assert "-DEPTH = 4" in diff and "+DEPTH = 6" in diff
    assert apply_unified_diff(BASE, diff) == new


def test_unified_diff_that_does_not_apply():
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1,1 +1,1 @@\n-LR = 9.9\n+LR = 1.0\n"
    with pytest.raises(EditError, match="does not apply"):
        apply_unified_diff(BASE, diff)


def test_whole_file_and_checks():
    new = apply_edit(BASE, Edit(files={"train.py": "print('hi')\n"}))
    check_files(BASE, new, ["train.py"])
    with pytest.raises(EditError, match="does not compile"):
        check_files(BASE, {"train.py": "def (:\n"}, ["train.py"])
    with pytest.raises(EditError, match="non-editable"):
        check_files({**BASE, "prepare.py": "a"}, {**BASE, "prepare.py": "b"}, ["train.py"])
    with pytest.raises(EditError, match="changes nothing"):
        check_files(BASE, dict(BASE), ["train.py"])


def test_content_hash_is_order_independent():
    a = {"a.py": "1", "b.py": "2"}
    assert content_hash(a) == content_hash(dict(reversed(list(a.items()))))
    assert content_hash(a) != content_hash({"a.py": "1", "b.py": "3"})


def test_parse_multiple_blocks_same_file():
    text = ("train.py\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 0.3\n>>>>>>> REPLACE\n"
            "<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 2\n>>>>>>> REPLACE\n")
    assert [b[0] for b in parse_search_replace(text)] == ["train.py", "train.py"]


@pytest.mark.parametrize("line", ["***", "```", "`", ":", "**:**", "` * :", "*\t*"])
def test_a_line_naming_nothing_before_a_block_means_the_default_file(line):
    # `.split()[-1]` of such a line raised IndexError, which check_edit did not catch: the answer was lost
    block = "<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"
    assert parse_search_replace(f"{line}\n{block}", default_file="train.py") == [("train.py", "DEPTH = 4", "DEPTH = 5")]
    # after a named block, it means the previous block's file
    first = "other.py\n<<<<<<< SEARCH\nLR = 0.1\n=======\nLR = 0.3\n>>>>>>> REPLACE\n"
    assert [b[0] for b in parse_search_replace(f"{first}{line}\n{block}", default_file="train.py")] == [
        "other.py", "other.py"]
    checked = check_edit(BASE, Edit(search_replace=f"{line}\n{block}"), ["train.py"])
    assert checked.reason is None and "DEPTH = 5" in checked.files["train.py"]


def test_a_patch_whose_context_does_not_match_says_so_not_that_its_file_is_missing():
    """Found by review: the -p0 try of an a/ b/ patch answered "b/train.py: No such file or directory"."""
    base = {"train.py": "A = 1\nB = 2\n"}
    for head in ("--- a/train.py\n+++ b/train.py\n", "--- train.py\n+++ train.py\n"):
        with pytest.raises(EditError) as exc:
            apply_unified_diff(base, head + "@@ -1,1 +1,1 @@\n-not in the file\n+other\n")
        assert str(exc.value) == "patch does not apply: train.py: patch does not apply"
    with pytest.raises(EditError) as exc:  # a file that is really missing is said so
        apply_unified_diff(base, "--- a/nope.py\n+++ b/nope.py\n@@ -1,1 +1,1 @@\n-x\n+y\n")
    assert str(exc.value) == "patch does not apply: nope.py: No such file or directory"


def test_check_edit_turns_an_unexpected_error_into_an_invalid_reason(monkeypatch):
    # a bug in parsing or applying must leave the answer storable as `invalid`, not raise past the scheduler and API
    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr("farm.candidates.apply_search_replace", broken)
    checked = check_edit(BASE, Edit(search_replace="train.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE"),
                         ["train.py"])
    assert checked.reason is not None and "IndexError" in checked.reason
    assert checked.files == {} and checked.digest is None and "<<<<<<< SEARCH" in checked.diff


def test_farm_template_dir_overrides_the_default_template_as_on_the_worker(tmp_path, monkeypatch):
    from farm.harness import harness_checksum
    from farm.templates import fixed_digest, template_files
    from worker.workdir import template_dir as worker_template_dir

    (tmp_path / "train.py").write_text("X = 1\n")
    (tmp_path / "prepare.py").write_text("# harness\n")
    monkeypatch.setenv("FARM_TEMPLATE_DIR", str(tmp_path))
    assert template_files("default") == {"train.py": "X = 1\n", "prepare.py": "# harness\n"}
    # a program created here is runnable by a worker with the same setting
    assert fixed_digest("default", ["train.py"]) == harness_checksum(worker_template_dir("default"))


@pytest.mark.parametrize("relative", [True, False])
def test_unified_diff_cannot_write_outside_its_folder(tmp_path, relative):
    """A patch from an LLM or the API names a path out of the scratch folder: refused, and nothing is written
    there (git apply ran with --unsafe-paths before, and wrote the file before the edit was refused)."""
    out = tmp_path / "host"
    out.mkdir()
    path = ("b/" + "../" * 40 + str(out).lstrip("/") if relative else str(out)) + "/escaped.txt"
    diff = f"--- /dev/null\n+++ {path}\n@@ -0,0 +1 @@\n+pwned\n"
    with pytest.raises(EditError, match="outside the template"):
        apply_unified_diff(BASE, diff)
    assert list(out.iterdir()) == []


def test_unified_diff_quoted_dotdot_path_refused_by_git(tmp_path):
    diff = ('diff --git "a/\\056\\056/x.py" "b/\\056\\056/x.py"\nnew file mode 100644\n--- /dev/null\n'
            '+++ "b/\\056\\056/x.py"\n@@ -0,0 +1 @@\n+pwned = 1\n')
    with pytest.raises(EditError, match="does not apply"):
        apply_unified_diff(BASE, diff)


def test_unified_diff_cannot_read_a_host_file_through_a_symlink(tmp_path):
    """Replacing train.py by a symbolic link to a host file used to read that file into the candidate (and so
    into the stored diff, shown over the API)."""
    secret = tmp_path / "secret.py"
    secret.write_text("API_KEY = 'do-not-leak'\n")
    diff = ("diff --git a/train.py b/train.py\ndeleted file mode 100644\n--- a/train.py\n+++ /dev/null\n"
            "@@ -1,4 +0,0 @@\n" + "".join("-" + line + "\n" for line in BASE["train.py"].splitlines())
            + f"diff --git a/train.py b/train.py\nnew file mode 120000\n--- /dev/null\n+++ b/train.py\n"
            f"@@ -0,0 +1 @@\n+{secret}\n\\ No newline at end of file\n")
    with pytest.raises(EditError, match="symbolic link") as info:
        apply_unified_diff(BASE, diff)
    assert "do-not-leak" not in str(info.value)


def test_unified_diff_content_lines_that_look_like_headers_are_content():
    """A removed line `-- /x` or an added `++ ../y` inside a hunk is content (its diff lines read `--- /x` and
    `+++ ../y`), not a path: the check reads only header lines."""
    base = {"notes.md": "a\n-- /usr/share\nb\n"}
    new = {"notes.md": "a\n++ ../up\nb\n"}
    diff = unified_diff(base, new)
    assert "\n--- /usr/share\n" in diff and "\n+++ ../up\n" in diff
    assert apply_unified_diff(base, diff) == new


TEMPLATE = (Path(__file__).resolve().parents[2] / "training_template" / "train.py").read_text()


def test_a_search_holding_the_templates_banner_comments_applies():
    """Found by review: the divider was not anchored to a whole line, so the first `=====` inside a banner comment
    (`# =====...`) ended SEARCH, and the block was refused as matching 21 places."""
    lines = TEMPLATE.split("\n")
    at = lines.index("# Hyperparameters (one per line: the search tool edits these lines)")
    search = "\n".join(lines[at - 1:at + 4])  # banner, title, banner, blank, DEPTH
    assert search.startswith("# =====") and "DEPTH = " in search
    replace = search.replace("DEPTH = ", "DEPTH = 1 + ", 1)
    out = apply_search_replace({"train.py": TEMPLATE},
                               f"train.py\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n")
    assert out["train.py"] == TEMPLATE.replace(search, replace, 1)


@pytest.mark.parametrize("filler", [" " * 200_000, "`" * 200_000, "<" * 200_000, "=" * 200_000, "a." * 100_000])
def test_parsing_blocks_takes_linear_time_on_a_long_line(filler):
    """Found by review: the block regex backtracked on a long line of spaces: check_edit took 7 s at 16k (minutes at
    200k, which the API accepts), holding the GIL, so the scheduler froze. Read line by line, it takes milliseconds;
    the bound is loose so a busy machine cannot fail it."""
    block = "train.py\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"
    t0 = time.perf_counter()
    for text in (block + filler + "\n", filler + "\n" + block, block + filler + "\n" + block):
        checked = check_edit(BASE, Edit(search_replace=text), ["train.py"])
        assert checked.reason is None or "matches" in checked.reason or "not found" in checked.reason
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("cut,missing", [
    ("<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPL", "no >>>>>>> REPLACE"),
    ("<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5", "no >>>>>>> REPLACE"),
    ("<<<<<<< SEARCH\nDEPTH = 4\n==", "no ======="),
    ("<<<<<<< SEARCH\n", "no ======="),
])
def test_a_cut_off_last_block_is_refused_not_dropped(cut, missing):
    """Found by review: a last block cut off (an answer stopped at max_tokens) was dropped silently and the first half
    of the change stored valid under a description of all of it."""
    first = "train.py\n<<<<<<< SEARCH\nLR = 0.1  # learning rate\n=======\nLR = 0.2  # learning rate\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError, match=f"block 2 is incomplete: {missing}"):
        parse_search_replace(first + cut)
    checked = check_edit(BASE, Edit(search_replace=first + cut), ["train.py"])
    assert checked.reason is not None and "block 2 is incomplete" in checked.reason and checked.files == {}
    # a block that opens before the previous one closed is incomplete too, not merged with the next one
    with pytest.raises(EditError, match="block 1 is incomplete: no >>>>>>> REPLACE"):
        parse_search_replace("<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n" + first, default_file="train.py")


@pytest.mark.parametrize("line", ["### File: `train.py`", "train.py (hyperparameters):", "In `train.py`:",
                                  "**train.py**", "1. train.py", "Here is the change:", "Also raise the depth:",
                                  "'train.py':", "./train.py", "Edit train.py.", "Changes:", "**Edit:**"])
def test_the_line_before_a_block_names_a_file_only_by_a_file_name(line):
    """Found by review: the last word of the line before a block was its file, so markdown and prose named files
    (`'`train.py'`, `'(hyperparameters)'`, `'change'`) and the block was refused as not editable."""
    block = "<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"
    first = "train.py\n<<<<<<< SEARCH\nLR = 0.1  # learning rate\n=======\nLR = 0.2  # learning rate\n>>>>>>> REPLACE\n"
    for text in (f"{line}\n{block}", f"{first}\n{line}\n```python\n{block}```\n"):
        checked = check_edit(BASE, Edit(search_replace=text), ["train.py"])
        assert checked.reason is None and "DEPTH = 5" in checked.files["train.py"]


@pytest.mark.parametrize("line", ["prepare.py", "### File: `prepare.py`", "In prepare.py:", "kernels/extra.py",
                                  "Makefile", "**Dockerfile**", "### File: `prepare`"])
def test_a_block_naming_a_file_that_is_not_editable_is_still_refused(line):
    block = "<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n>>>>>>> REPLACE\n"
    with pytest.raises(EditError, match="not an editable file"):
        apply_search_replace(BASE, f"{line}\n{block}", default_file="train.py")


def test_the_trailing_whitespace_fallback_changes_only_the_matched_lines():
    """Found by review: a SEARCH that matched only without trailing whitespace replaced in a copy of the file with the
    trailing whitespace of every line stripped, inside triple-quoted strings too."""
    base = {"train.py": 'DOC = """keep   \ntrailing\t\n"""\nLR = 0.1   \nDEPTH = 4  \nEND = 1 \n'}
    for search in ("LR = 0.1 \nDEPTH = 4", "LR = 0.1\nDEPTH = 4\t", "LR = 0.1\t\nDEPTH = 4"):
        out = apply_search_replace(base, f"train.py\n<<<<<<< SEARCH\n{search}\n=======\nLR = 0.2\nDEPTH = 5\n"
                                         ">>>>>>> REPLACE\n")["train.py"]
        assert out == 'DOC = """keep   \ntrailing\t\n"""\nLR = 0.2\nDEPTH = 5\nEND = 1 \n', out


def test_a_unified_diff_keeps_every_files_line_endings():
    """Found by review: the files were read back in text mode, so a CRLF train.py came back all LF (the one-line
    change stored as a rewrite of every line) and a raw \\r in a string of a file the diff never named became a
    newline (the candidate then failed to compile). A SEARCH/REPLACE of the same change gives the same files."""
    from farm.candidates import Edit, apply_edit, apply_unified_diff, check_edit

    base = {"train.py": "A = 1\r\nB = 2\r\nC = 3\r\n", "cfg.py": "X = 'a\rb'\n"}
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1,3 +1,3 @@\n A = 1\r\n-B = 2\r\n+B = 5\r\n C = 3\r\n"
    want = {"train.py": "A = 1\r\nB = 5\r\nC = 3\r\n", "cfg.py": "X = 'a\rb'\n"}
    assert apply_unified_diff(base, diff) == want
    assert apply_edit(base, Edit(search_replace="train.py\n<<<<<<< SEARCH\nB = 2\n=======\nB = 5\n>>>>>>> REPLACE\n")) == want
    checked = check_edit(base, Edit(unified_diff=diff), ["train.py", "cfg.py"])
    assert checked.reason is None and checked.files == want
