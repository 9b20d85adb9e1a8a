"""The mutation proposer: finds hyperparameters, perturbs them by name, keeps the rest of the line."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from farm.candidates import apply_edit, check_files, content_hash
from scheduler.mutation import MutationProposer, find_hyperparameters, mutate, perturb
from scheduler.proposers import ProposalContext, ProposerError

TRAIN = '''"""toy train.py"""
from prepare import pick

# ---- Hyperparameters ----
DEPTH = pick(h100=8, cpu=2)  # number of layers
MATRIX_LR = pick(h100=0.04, cpu=0.02)  # Muon learning rate
EMBEDDING_LR = 0.6  # AdamW lr for embeddings
TOTAL_BATCH_SIZE = pick(h100=2**19, cpu=2**13)  # tokens per step
DEVICE_BATCH_SIZE = 128  # rows per micro-batch
WARMDOWN_RATIO = 0.5  # share of the budget spent decaying
WEIGHT_DECAY = 0.0  # cautious weight decay
WINDOW_PATTERN = "SSSL"  # not a number
SEED = 42  # never perturbed
USE_FLAG = True  # not a number

def f():
    INNER = 3  # indented: not a hyperparameter
    return INNER
'''


def test_find_hyperparameters_reads_the_profile_value():
    hps = {h.name: h for h in find_hyperparameters(TRAIN, "cpu")}
    assert set(hps) == {"DEPTH", "MATRIX_LR", "EMBEDDING_LR", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE",
                        "WARMDOWN_RATIO", "WEIGHT_DECAY"}
    assert hps["DEPTH"].value == 2 and hps["MATRIX_LR"].value == 0.02 and hps["TOTAL_BATCH_SIZE"].value == 2**13
    line = TRAIN.splitlines()[hps["MATRIX_LR"].line]
    assert line[hps["MATRIX_LR"].start:hps["MATRIX_LR"].end] == "0.02"
    assert {h.name: h.value for h in find_hyperparameters(TRAIN, "h100")}["DEPTH"] == 8


def test_name_aware_rules():
    rng = random.Random(0)
    hps = {h.name: h for h in find_hyperparameters(TRAIN, "cpu")}
    for _ in range(50):
        assert perturb(hps["DEPTH"], rng) in (1, 3)
        assert perturb(hps["TOTAL_BATCH_SIZE"], rng) in (2**12, 2**14)
        assert perturb(hps["DEVICE_BATCH_SIZE"], rng) in (64, 256)
        r = perturb(hps["WARMDOWN_RATIO"], rng)
        assert r is not None and 0.0 <= r <= 1.0 and r != 0.5
        lr = perturb(hps["MATRIX_LR"], rng)
        assert lr is not None and round(lr / 0.02, 6) in (0.5, 0.7, 1.4, 2.0)
        assert perturb(hps["WEIGHT_DECAY"], rng) == 0.1


REAL = (Path(__file__).resolve().parents[2] / "training_template" / "train.py").read_text()


@pytest.mark.parametrize("profile", ["cpu", "h100"])
def test_real_template_hyperparameters_are_perturbed_sanely(profile):
    """On the real train.py: ASPECT_RATIO (32) and MLP_RATIO (4) were clamped to [0, 1] as fractions,
    MUON_MOMENTUM_WARMUP (30 steps) capped at 0.999 as a momentum and written as 0."""
    hps = {h.name: h for h in find_hyperparameters(REAL, profile)}
    step = {n: sorted({perturb(hps[n], random.Random(i)) for i in range(100)} - {None})
            for n in ("ASPECT_RATIO", "MLP_RATIO", "MUON_MOMENTUM_WARMUP")}
    v = {n: hps[n].value for n in step}
    assert step == {"ASPECT_RATIO": [v["ASPECT_RATIO"] // 2, v["ASPECT_RATIO"] * 2], "MLP_RATIO": [3, 5],
                    "MUON_MOMENTUM_WARMUP": [v["MUON_MOMENTUM_WARMUP"] // 2, v["MUON_MOMENTUM_WARMUP"] * 2]}
    for hp in hps.values():
        for i in range(100):
            new = perturb(hp, random.Random(i))
            if new is None:
                continue
            assert new != hp.value and isinstance(new, int) == hp.is_int, (hp, new)
            assert not (hp.value > 0 and new <= 0), (hp, new)  # a positive value stays positive
            if ("RATIO" in hp.name or "FRAC" in hp.name) and hp.value <= 1:
                assert 0 <= new <= 1, (hp, new)


def test_no_change_after_rounding_is_never_proposed():
    # an integer written where the rule draws fractions: 0 -> 0.1 was written "0" ("WEIGHT_DECAY 0 -> 0"),
    # 1 * 0.5 -> "0" a learning rate out of range
    src = "WEIGHT_DECAY = 0  # off\nMUON_MOMENTUM = 1  # int\nSCALAR_LR = 1  # int\nWARMUP_RATIO = 0  # none\n"
    hps = find_hyperparameters(src, "cpu")
    outs = {h.name: {perturb(h, random.Random(i)) for i in range(100)} for h in hps}
    assert outs == {"WEIGHT_DECAY": {None}, "MUON_MOMENTUM": {None}, "SCALAR_LR": {None, 2},
                    "WARMUP_RATIO": {None}}
    rng = random.Random(0)
    for _ in range(50):
        try:
            new, desc = mutate(src, "cpu", rng)
        except ProposerError:
            continue
        assert desc == "SCALAR_LR 1 -> 2" and new != src


def test_mutate_changes_only_the_value_of_the_profile():
    rng = random.Random(3)
    for _ in range(30):
        new, desc = mutate(TRAIN, "cpu", rng)
        changed = [(a, b) for a, b in zip(TRAIN.splitlines(), new.splitlines(), strict=True) if a != b]
        assert len(changed) == 1, desc
        old, line = changed[0]
        assert line.split("#")[1] == old.split("#")[1]  # comment kept
        if "pick(" in old:
            assert "h100=" + old.split("h100=")[1].split(",")[0] in line  # other profile untouched
        compile(new, "train.py", "exec")
        assert " -> " in desc


def test_proposer_output_validates_and_avoids_known_content():
    ctx = ProposalContext(program_id=1, slug="p", profile="cpu", instructions="", head_commit="a" * 40,
                          head_files={"train.py": TRAIN}, editable=["train.py"])
    seen: set[str] = set()
    prop = MutationProposer()
    for seed in range(20):
        p = prop.propose(ProposalContext(**{**ctx.__dict__, "seed": seed, "known_hashes": frozenset(seen)}))
        new = apply_edit(ctx.head_files, p.edit)
        check_files(ctx.head_files, new, ["train.py"])
        h = content_hash(new)
        assert h not in seen
        seen.add(h)


def test_proposer_errors_without_hyperparameters():
    ctx = ProposalContext(program_id=1, slug="p", profile="cpu", instructions="", head_commit="a" * 40,
                          head_files={"train.py": "print('hi')\n"}, editable=["train.py"])
    with pytest.raises(ProposerError):
        MutationProposer().propose(ctx)
