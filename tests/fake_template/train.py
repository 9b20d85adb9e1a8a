"""Fake candidate: 'trains' for the budget printing progress lines, then reports."""
import time

import prepare

t0 = time.time()
step = 0
while time.time() - t0 < prepare.TIME_BUDGET:
    step += 1
    elapsed = time.time() - t0
    prepare.progress_line(step, min(100.0, 100 * elapsed / prepare.TIME_BUDGET), 4.0 / (1 + elapsed))
    time.sleep(0.05)
prepare.finish(1.5 + 0.001 * (prepare.SEED % 7), steps=step)
