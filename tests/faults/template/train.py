"""Fault-test train.py: 'trains' for the budget; val_bpb is a smooth function of the hyperparameters
(plus a little seed noise), so mutations are sometimes kept and the branch head moves."""

import math
import time

import prepare
from prepare import pick

# ---- Hyperparameters ----
DEPTH = pick(h100=8, cpu=3)  # number of layers
MATRIX_LR = pick(h100=0.04, cpu=0.01)  # Muon learning rate
EMBEDDING_LR = 0.2  # AdamW lr for embeddings
WARMDOWN_RATIO = 0.2  # share of the budget spent decaying

# ---- Loop ----
t0 = time.time()
step = 0
while time.time() - t0 < prepare.TIME_BUDGET:
    step += 1
    elapsed = time.time() - t0
    prepare.progress_line(step, min(100.0, 100 * elapsed / prepare.TIME_BUDGET), 4.0 / (1 + elapsed))
    time.sleep(0.1)

# ---- Eval ----
val = (1.0 + 0.02 * (DEPTH - 6) ** 2 + 0.05 * math.log(MATRIX_LR / 0.04) ** 2
       + 0.03 * math.log(EMBEDDING_LR / 0.6) ** 2 + 0.05 * (WARMDOWN_RATIO - 0.5) ** 2
       + 0.0005 * ((prepare.SEED * 7919) % 13) / 13)
prepare.finish(val, steps=step)
