"""End-to-end runs of the training template on the cpu profile: `python train.py` as the worker starts it
(cwd training_template, FARM_* environment, nonce on an inherited fd), and the candidate edits the harness
must survive (a diverging learning rate, a forged summary line, a monkeypatched evaluation)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "training_template"
sys.path.insert(0, str(TEMPLATE))

import prepare  # noqa: E402

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth"]
RESULT_FIELDS = {"val_bpb", "test_bpb", "training_seconds", "total_seconds", "startup_seconds", "eval_seconds",
                 "peak_vram_mb", "mfu_percent", "total_tokens_m", "num_steps", "num_params_m", "depth", "device",
                 "torch_version", "profile", "seed", "nonce", "digest"}


def farm_env(data: Path, cache: Path, result: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_PROFILE="cpu", FARM_DATA_DIR=str(data), FARM_CACHE_DIR=str(cache),
               FARM_RESULT_PATH=str(result), FARM_SEED="1337", **extra)
    return env


def run(cmd: list[str], env: dict, cwd: Path = TEMPLATE, nonce: str | None = None,
        timeout: float = 170) -> tuple[subprocess.CompletedProcess, float]:
    fds: tuple[int, ...] = ()
    if nonce is not None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, nonce.encode() + b"\n")
        os.close(write_fd)
        env = dict(env, FARM_NONCE_FD=str(read_fd))
        fds = (read_fd,)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    return proc, time.time() - t0


def last_summary(stdout: str) -> dict[str, str]:
    block = stdout[stdout.rindex("---\n") + 4:]
    lines = block.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == SUMMARY_KEYS
    for ln in lines:
        assert re.fullmatch(r"[A-Za-z_]+: +\S+", ln), ln
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in lines)}


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*"))}


def candidate_copy(tmp_path: Path, edit) -> Path:
    copy = tmp_path / "candidate"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("__pycache__", "result.json"))
    train = copy / "train.py"
    train.write_text(edit(train.read_text()))
    return copy


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """`python prepare.py` once, as the worker does before it spawns candidates."""
    root = tmp_path_factory.mktemp("farm")
    data, cache = root / "data", root / "cache"
    proc, _ = run([sys.executable, "prepare.py"], farm_env(data, cache, root / "unused.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cache" in proc.stdout
    return data, cache


@pytest.mark.slow
def test_cpu_run_from_a_cold_cache_learns_signs_and_reports(tmp_path):
    data, cache, result = tmp_path / "data", tmp_path / "cache", tmp_path / "out" / "result.json"
    env = farm_env(data, cache, result, FARM_TIME_BUDGET="20")
    proc, elapsed = run([sys.executable, "train.py"], env, nonce="9f3a1c")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert elapsed < 90, f"cpu run took {elapsed:.1f}s"

    payload = json.loads(result.read_text())
    assert RESULT_FIELDS <= set(payload)
    assert payload["nonce"] == "9f3a1c"
    assert payload["digest"] == prepare.result_digest(payload, "9f3a1c")
    assert payload["profile"] == "cpu" and payload["seed"] == 1337 and payload["time_budget"] == 20
    assert 20 <= payload["training_seconds"] < 40 and payload["num_steps"] >= 5
    assert payload["total_seconds"] >= payload["startup_seconds"] + payload["training_seconds"]
    assert payload["eval_seconds"] > 0 and payload["test_bpb"] > 0
    assert payload["harness_sha256"] == prepare.harness_checksum(TEMPLATE)

    summary = last_summary(proc.stdout)
    assert summary["val_bpb"] == f"{payload['val_bpb']:.6f}"
    assert summary["num_steps"] == str(payload["num_steps"]) and summary["depth"] == str(payload["depth"])
    assert proc.stdout.rstrip().endswith(f"depth:            {payload['depth']}")  # the summary comes last

    # the same harness evaluating a freshly initialised model (no steps at all)
    untrained_path = tmp_path / "untrained.json"
    proc, _ = run([sys.executable, "train.py"], dict(env, FARM_MAX_STEPS="0", FARM_RESULT_PATH=str(untrained_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    untrained = json.loads(untrained_path.read_text())
    assert untrained["num_steps"] == 0 and untrained["training_seconds"] == 0
    assert untrained["val_bpb"] > 7.0  # about log2(257) bits for a near-uniform byte model
    assert payload["val_bpb"] < untrained["val_bpb"] - 2.0, (payload["val_bpb"], untrained["val_bpb"])


@pytest.mark.slow
def test_same_seed_same_steps_same_bpb_from_a_read_only_cache(prepared, tmp_path):
    data, cache = prepared
    if os.geteuid() != 0:  # root ignores permissions; the snapshot below checks it either way
        for p in [cache, data, *cache.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    before = snapshot(data, cache)
    values = []
    for i in range(2):
        path = tmp_path / f"r{i}.json"
        env = farm_env(data, cache, path, FARM_TIME_BUDGET="1000", FARM_MAX_STEPS="6", FARM_EVAL_TOKENS="8192")
        proc, _ = run([sys.executable, "train.py"], env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "prepare: data cache ready" not in proc.stdout  # nothing rebuilt
        payload = json.loads(path.read_text())
        assert payload["num_steps"] == 6 and payload["max_steps"] == 6 and payload["eval_tokens"] == 8192
        values.append(payload["val_bpb"])
    assert abs(values[0] - values[1]) < 1e-3, values
    assert snapshot(data, cache) == before, "train.py wrote to the prepared cache"
    if os.geteuid() != 0:
        for p in [cache, data, *cache.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_torch_profile_summarises_timed_steps_and_keeps_the_result(prepared, tmp_path):
    # FARM_TORCH_PROFILE: the steps after the first timed one go through torch.profiler; on the CPU the summary
    # lists CPU time (no kernels) and both optimizers' steps, and the run's result is written as usual.
    data, cache = prepared
    path, summary = tmp_path / "r.json", tmp_path / "prof" / "profile.txt"
    env = farm_env(data, cache, path, FARM_TIME_BUDGET="1000", FARM_MAX_STEPS="8", FARM_EVAL_TOKENS="8192",
                   FARM_TORCH_PROFILE=str(summary), FARM_TORCH_PROFILE_STEPS="4")
    proc, _ = run([sys.executable, "train.py"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(path.read_text())["num_steps"] == 8
    text = summary.read_text()
    assert text.startswith("torch.profiler over 4 timed step(s) on cpu"), text[:200]
    assert re.search(r"^Optimizer\.step#Muon\.step .*\d", text, re.M) and "Optimizer.step#AdamW.step" in text
    assert re.search(r"^ +\d+\.\d+ +\d+\.\d +\d+  aten::mm$", text, re.M), text
    raw = json.loads(Path(f"{summary}.json").read_text())
    assert raw["steps"] == 4 and any(e["name"] == "aten::mm" and e["calls"] > 0 for e in raw["events"])
    # a run that ends inside the profiled window writes what it has
    env.update(FARM_MAX_STEPS="3", FARM_TORCH_PROFILE_STEPS="10")
    proc, _ = run([sys.executable, "train.py"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary.read_text().startswith("torch.profiler over 1 timed step(s) on cpu")


@pytest.mark.slow
def test_exploding_learning_rate_fails_fast_with_exit_3(prepared, tmp_path):
    copy = candidate_copy(tmp_path, lambda src: re.sub(r"^(\w+_LR) = \S+", r"\1 = 1e30", src, flags=re.M))
    result = tmp_path / "result.json"
    proc, elapsed = run([sys.executable, "train.py"],
                        farm_env(*prepared, result, FARM_TIME_BUDGET="1000", FARM_MAX_STEPS="50"), cwd=copy)
    assert proc.returncode == 3, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert "FAIL" in proc.stdout and "---" not in proc.stdout
    assert not result.exists()


@pytest.mark.slow
def test_a_forged_summary_line_does_not_reach_the_result(prepared, tmp_path):
    forge = ('print("---\\nval_bpb:          0.100000", flush=True)\n'
             'import os as _os\nprint("NONCE_ENV", _os.environ.get("FARM_NONCE_FD"), flush=True)\n')
    copy = candidate_copy(tmp_path, lambda src: src.replace("from prepare import pick\n",
                                                            "from prepare import pick\n" + forge, 1))
    result = tmp_path / "result.json"
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, result, FARM_TIME_BUDGET="1000",
                                                         FARM_MAX_STEPS="2", FARM_EVAL_TOKENS="4096"),
                  cwd=copy, nonce="abc123")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_bpb:          0.100000" in proc.stdout and "NONCE_ENV None" in proc.stdout
    payload = json.loads(result.read_text())
    assert payload["val_bpb"] > 1.0
    assert last_summary(proc.stdout)["val_bpb"] == f"{payload['val_bpb']:.6f}"
    assert payload["digest"] == prepare.result_digest(payload, "abc123")
    assert prepare.harness_checksum(copy) == prepare.harness_checksum(TEMPLATE)


@pytest.mark.slow
def test_a_monkeypatched_evaluation_is_refused(prepared, tmp_path):
    patch = "prepare.evaluate_bpb = lambda *a, **k: (0.1, 1)\n"
    copy = candidate_copy(tmp_path, lambda src: src.replace("prepare.finish(", patch + "prepare.finish(", 1))
    result = tmp_path / "result.json"
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, result, FARM_MAX_STEPS="1"), cwd=copy)
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "evaluate_bpb" in proc.stderr and not result.exists()


def _before_finish(code: str):
    return lambda src: src.replace("prepare.finish(", code + "prepare.finish(", 1)


PEEK = '''
class _Peek(torch.nn.Module):
    """Causal whenever the batch looks like the old in-batch probe (rows i and i + n share a first half), reading
    the target (the next input token) otherwise: it found the old check, not the new one."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x, y=None):
        logits = self.inner(x) if y is None else self.inner(x, y)
        n, half = x.size(0) // 2, x.size(1) // 2
        if y is not None or (n and torch.equal(x[:n, :half], x[n:2 * n, :half])):
            return logits
        peek = torch.zeros_like(logits)
        peek[:, :-1].scatter_(-1, x[:, 1:, None], 8.0)
        return logits + peek
model = _Peek(model)
'''

# found by review: the harness recorded a digest per array the first time it was sealed, and its sealing function was
# a module attribute, so sealing a forged table before the harness loaded its own made val_bpb 4x better, exit 0
FORGED_TABLE = '''
_tb = prepare.Data(prepare.cache_path()).token_bytes * 4
(getattr(prepare, "_seal", None) or (lambda name, a: None))(f"token_bytes:{prepare.cache_path()}", _tb)
'''


def _forge_table(src: str) -> str:
    """The forged table is sealed right after `import prepare` (before the harness loads its data) and put in place
    of the harness's before finish()."""
    src = src.replace("\nimport prepare\n", "\nimport prepare\n" + FORGED_TABLE, 1)
    return _before_finish("prepare.load_data().token_bytes = _tb\n")(src)


@pytest.mark.slow
@pytest.mark.parametrize("name, code, expected", [
    # found by review: each one made val_bpb (and test_bpb) three times better or more, and was marked succeeded
    ("peek", PEEK, "depend on later tokens"),
    ("token_bytes", "_tb = prepare.load_data().token_bytes\n_tb.setflags(write=True)\n_tb *= 3\n",
     "evaluation data was changed in-process: token_bytes"),
    ("eval_rows", "_r = prepare.eval_rows('val')\n_r.setflags(write=True)\n_r[:, 1:] = _r[:, :1]\n",
     "evaluation data was changed in-process: eval_rows:val"),
    ("a table vouched for by the harness's own seal", _forge_table, "evaluation data was changed in-process: token_bytes"),
    ("fewer eval tokens", "prepare.EVAL_TOKENS = 256\n", "harness functions were replaced in-process: EVAL_TOKENS"),
    ("longer budget", "prepare.TIME_BUDGET = 900.0\n", "TIME_BUDGET"),
    ("a slower clock", "import time as _t\n_t.perf_counter = _t.process_time\n", "time functions"),
    ("a looser probe", "prepare.CAUSAL_TOL = {'cpu': 99.0, 'cuda': 99.0}\n", "CAUSAL_TOL"),
])
def test_a_candidate_that_games_the_evaluation_is_refused(prepared, tmp_path, name, code, expected):
    copy = candidate_copy(tmp_path, code if callable(code) else _before_finish(code))
    result = tmp_path / "result.json"
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, result, FARM_TIME_BUDGET="1000",
                                                         FARM_MAX_STEPS="2", FARM_EVAL_TOKENS="8192"), cwd=copy)
    assert proc.returncode == 5, (name, proc.stdout[-1500:], proc.stderr[-1500:])
    assert expected in proc.stderr and not result.exists(), proc.stderr[-1500:]


STORAGE_PEEK = '''
class _StoragePeek(torch.nn.Module):
    """Reads the targets of the last position through the storage behind its input, when the input is a view of the
    whole (B, T + 1) evaluation batch: it writes a marker file when it could."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x, y=None):
        if y is None and not self.training:
            B, T = x.shape
            if x.stride(0) == T + 1 and x.untyped_storage().nbytes() >= B * (T + 1) * x.element_size():
                import os
                open(os.environ["PEEK_MARKER"], "w").close()
        return self.inner(x) if y is None else self.inner(x, y)
model = _StoragePeek(model)
'''


@pytest.mark.slow
def test_the_evaluation_input_holds_no_targets_behind_it(prepared, tmp_path):
    """The model gets a copy of each batch's inputs, not a view: a view's storage held the targets of the row's last
    position, which the causal probe cannot see (found by review: val_bpb 8.0056 -> 7.9431, run succeeded)."""
    copy = candidate_copy(tmp_path, _before_finish(STORAGE_PEEK))
    marker = tmp_path / "peeked"
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, tmp_path / "r.json", FARM_MAX_STEPS="1",
                                                         FARM_EVAL_TOKENS="4096", PEEK_MARKER=str(marker)), cwd=copy)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert not marker.exists()


@pytest.mark.slow
def test_a_written_token_bytes_fails_at_once(prepared, tmp_path):
    """The harness's arrays are read-only: the one-line `token_bytes *= 3` is an error, not a 3x better score."""
    copy = candidate_copy(tmp_path, _before_finish("prepare.load_data().token_bytes[:] *= 3\n"))
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, tmp_path / "r.json", FARM_MAX_STEPS="1",
                                                         FARM_EVAL_TOKENS="4096"), cwd=copy)
    assert proc.returncode == 1 and "read-only" in proc.stderr, proc.stderr[-1500:]


@pytest.mark.slow
def test_the_result_records_the_settings_the_process_found(prepared, tmp_path):
    """A candidate that rewrites os.environ before `import prepare` gets what it asked for, and the signed result
    says so (the worker compares run_env with what it set: worker/outcome.py)."""
    def edit(src: str) -> str:
        return src.replace("import gc\n", "import os\nos.environ['FARM_EVAL_TOKENS'] = '2048'\nimport gc\n", 1)
    copy = candidate_copy(tmp_path, edit)
    result = tmp_path / "result.json"
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, result, FARM_MAX_STEPS="1",
                                                         FARM_EVAL_TOKENS="8192"), cwd=copy, nonce="beef")
    assert proc.returncode == 0, proc.stderr[-1500:]
    payload = json.loads(result.read_text())
    assert payload["run_env"]["FARM_EVAL_TOKENS"] == "2048" and payload["run_env"]["FARM_PROFILE"] == "cpu"
    assert payload["run_env"]["FARM_TIME_BUDGET"] is None and payload["eval_tokens"] <= 2048


# ---- the isolated evaluation (FARM_EVAL_EXPORT + prepare.py --evaluate), as the worker runs it ----

def _export_and_evaluate(prepared, tmp_path: Path, copy: Path, **extra: str):
    """train.py exporting its model, then the harness's own copy scoring it in a second process."""
    export = tmp_path / "export" / "model.json"
    env = farm_env(*prepared, tmp_path / "train.json", FARM_EVAL_EXPORT=str(export), **extra)
    trained, _ = run([sys.executable, "train.py"], env, cwd=copy, nonce="aa")
    if trained.returncode != 0:
        return trained, None
    evaluated, _ = run([sys.executable, str(TEMPLATE / "prepare.py"), "--evaluate", str(export)],
                       dict(env, FARM_RESULT_PATH=str(tmp_path / "eval.json")), cwd=tmp_path, nonce="bb")
    return trained, evaluated


@pytest.mark.slow
def test_isolated_evaluation_scores_what_the_in_process_evaluation_scores(prepared, tmp_path):
    """The exported graph is the model: same seed, same steps, the same val_bpb and test_bpb as evaluating in the
    training process. The training result has no score; the evaluation's result is signed with its own nonce."""
    steps = dict(FARM_TIME_BUDGET="1000", FARM_MAX_STEPS="3", FARM_EVAL_TOKENS="8192")
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, tmp_path / "inproc.json", **steps), nonce="cc")
    assert proc.returncode == 0, proc.stderr[-1500:]
    inproc = json.loads((tmp_path / "inproc.json").read_text())
    trained, evaluated = _export_and_evaluate(prepared, tmp_path, TEMPLATE, **steps)
    assert trained.returncode == 0 and evaluated is not None, trained.stderr[-1500:]
    assert evaluated.returncode == 0, evaluated.stderr[-1500:]
    train_result = json.loads((tmp_path / "train.json").read_text())
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert train_result["evaluation"] == "exported" and "val_bpb" not in train_result
    assert train_result["num_steps"] == inproc["num_steps"] == 3
    assert scores["evaluation"] == "isolated" and scores["nonce"] == "bb"
    assert prepare.result_digest(scores, "bb") == scores["digest"]
    assert scores["val_bpb"] == pytest.approx(inproc["val_bpb"], rel=1e-6)
    assert scores["test_bpb"] == pytest.approx(inproc["test_bpb"], rel=1e-6)
    assert scores["eval_tokens"] == inproc["eval_tokens"] and scores["causal_probe_nats"] <= 1e-3
    assert re.search(r"^val_bpb: +[0-9.]+$", evaluated.stdout, re.M), evaluated.stdout


STATEFUL = '''
class _Remember(torch.nn.Module):
    """Keeps the last batch it saw in a buffer: with it, a forward could recognise the causal probe's batch."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("seen", torch.zeros(1))
    def forward(self, x, y=None):
        self.seen.add_(1)
        return self.inner(x) if y is None else self.inner(x, y)
model = _Remember(model)
'''


@pytest.mark.slow
@pytest.mark.parametrize("name, code, exit_code, expected", [
    # the in-process evaluation's cheats no longer reach the score: the second process never saw them
    ("token_bytes", "_d = prepare.load_data()\n_d.token_bytes = _d.token_bytes * 3\n", 0, None),
    ("evaluation swapped", "prepare.evaluate_bpb = lambda *a, **k: (0.1, 1)\n", 5, "evaluate_bpb"),
    ("peek", PEEK.replace("if y is not None or (n and torch.equal(x[:n, :half], x[n:2 * n, :half])):",
                          "if y is not None:"), 5, "depend on later tokens"),
    ("peek that looks for the probe", PEEK, 5, "torch.export cannot trace"),  # data-dependent: not a pure graph
    ("stateful forward", STATEFUL, 5, "writes to the model's own state"),
])
def test_the_isolated_evaluation_is_out_of_the_candidates_reach(prepared, tmp_path, name, code, exit_code, expected):
    steps = dict(FARM_TIME_BUDGET="1000", FARM_MAX_STEPS="2", FARM_EVAL_TOKENS="8192")
    _, honest = _export_and_evaluate(prepared, tmp_path / "honest", TEMPLATE, **steps)
    assert honest is not None and honest.returncode == 0, honest and honest.stderr[-1500:]
    honest_val = json.loads((tmp_path / "honest" / "eval.json").read_text())["val_bpb"]
    copy = candidate_copy(tmp_path, _before_finish(code))
    trained, evaluated = _export_and_evaluate(prepared, tmp_path / "cheat", copy, **steps)
    last = evaluated if evaluated is not None else trained
    assert last.returncode == exit_code, (name, trained.stderr[-1500:], last.stderr[-1500:])
    if expected:
        assert expected in last.stderr, last.stderr[-1500:]
    else:
        assert json.loads((tmp_path / "cheat" / "eval.json").read_text())["val_bpb"] == honest_val


@pytest.mark.slow
def test_training_after_the_clock_stops_is_refused(prepared, tmp_path):
    """Steps after the last tick are counted nowhere (an LLM might add a low-LR polish after the loop): finish()
    must follow the last step at once."""
    copy = candidate_copy(tmp_path, _before_finish("import time as _t\n_t.sleep(prepare.POST_CLOCK_SLACK + 1)\n"))
    proc, _ = run([sys.executable, "train.py"], farm_env(*prepared, tmp_path / "r.json", FARM_TIME_BUDGET="2",
                                                         FARM_EVAL_TOKENS="4096"), cwd=copy)
    assert proc.returncode == 5, proc.stderr[-1500:]
    assert "between the last clock tick and finish()" in proc.stderr, proc.stderr[-1500:]
