"""Program slugs (farm/programs.py)."""

from __future__ import annotations

import pytest

from farm.programs import ProgramError, slugify


def test_a_slug_cut_at_80_characters_does_not_end_in_a_dash():
    slug = slugify("a" * 79 + " b" * 10)  # the cut falls right after a separator
    assert slug == "a" * 79


def test_slugs_are_lowercase_words_and_never_all_digits():
    assert slugify("  Faster Muon: v2!  ") == "faster-muon-v2"
    assert slugify("2026") == "p-2026"
    with pytest.raises(ProgramError, match="letter or digit"):
        slugify("!!!")
