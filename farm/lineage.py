"""Git lineage: the farm repository, one branch per program, one commit per candidate.

The repository is bare (settings.repo_dir) and written only as git objects and refs: blobs, trees and
commits are written in-process as loose objects (gitdb, the object store GitPython uses; a candidate
costs no git process), refs with `update-ref` compare-and-set semantics, so no working tree or shared
index can be left half-written by a crash. Layout:

    refs/heads/research/<slug>               the program's branch: template commit, then keeps only
    refs/candidates/<slug>/<experiment-id>   every candidate, parent = the head it was proposed against
    refs/notes/commits                       metrics of each judged commit (shown by `git log`)

History is never rewritten: a branch only moves by fast-forward (`update-ref` with the old value
as a compare-and-set). The database (programs.head_commit) is the source of truth for a head; the
scheduler writes it first and then calls `sync_branch`, which is a fast-forward or a no-op, so a
crash between the two writes is repaired by the next sync. A commit's metrics cannot be in its
own message (the commit is made before the run and never amended), so they are attached as a
git note in trailer form (`Val-Bpb: ...`).

One writer: `Lineage.lock()` takes an exclusive file lock next to the repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import git
from gitdb import IStream, LooseObjectDB

from farm.db import SchedulerLockHeld

log = logging.getLogger(__name__)

AUTHOR = ("researchfarm", "farm@researchfarm.invalid")
FSYNC_CONFIG = ("-c", "core.fsync=committed", "-c", "core.fsyncMethod=fsync")  # git >= 2.36; older git ignores it


def _missing_dirs(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet (to be made for it), nearest first."""
    out, d = [], path.parent
    while not d.exists():
        out.append(d)
        d = d.parent
    return out


def _fsync_file(path: Path, made: Sequence[Path] = ()) -> None:
    """fsync a file and the directory that names it (a rename is durable only once its directory is), and the parent
    of each folder in `made` (made for it, an object's fan-out folder or a program's first ref folder: found only
    through its parent's entry)."""
    dirs = list(dict.fromkeys([path.parent, *(d.parent for d in made)]))
    for target, flags in [(path, os.O_RDONLY), *((d, os.O_RDONLY | os.O_DIRECTORY) for d in dirs)]:
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LineageError(RuntimeError):
    """A git operation the lineage refuses (not a fast-forward, unknown commit, ...)."""


class LineageUnavailable(LineageError):
    """The repository cannot be written or read right now (moved away, disk full, a ref locked): worth a retry,
    unlike a refusal. A candidate that meets it stays proposed instead of being stored invalid for good."""


class LockHeld(LineageError, SchedulerLockHeld):
    """Another scheduler holds the repository lock."""


@dataclass(frozen=True)
class ReplayResult:
    files: dict[str, str]  # the editable files after the 3-way apply (empty on conflict)
    conflicts: list[str]  # files with conflicting hunks


def branch_ref(slug: str) -> str:
    return f"refs/heads/research/{slug}"


def candidate_ref(slug: str, experiment_id: int) -> str:
    return f"refs/candidates/{slug}/{experiment_id}"


def format_message(description: str, *, rationale: str = "", trailers: dict[str, str] | None = None) -> str:
    subject = " ".join((description or "(no description)").split())[:200]
    body = rationale.strip()
    lines = [subject, ""]
    if body:
        lines += [body, ""]
    for key, value in (trailers or {}).items():
        lines.append(f"{key}: {' '.join(str(value).split())}")
    return "\n".join(lines).rstrip() + "\n"


class Lineage:
    """The farm repository. Methods are safe to call again after a crash (idempotent by ref)."""

    def __init__(self, repo_dir: Path) -> None:
        self.path = Path(repo_dir)
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            git.Repo.init(self.path, bare=True)
        self.repo = git.Repo(self.path)
        self._loose = LooseObjectDB(str(self.path / "objects"))  # writes in-process (the repo's odb runs git)
        self._read_lock = threading.Lock()
        self._lock_fd: int | None = None

    # ---- locking ----
    def acquire(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(str(self.path.parent / f".{self.path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(f"another scheduler holds the lock on {self.path}") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def lock(self) -> Iterator[Lineage]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    # ---- low level ----
    def _git(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        # core.fsync: objects and refs written by git itself (update-ref, notes) reach the disk before it exits
        full_env = {**os.environ, "GIT_AUTHOR_NAME": AUTHOR[0], "GIT_AUTHOR_EMAIL": AUTHOR[1],
                    "GIT_COMMITTER_NAME": AUTHOR[0], "GIT_COMMITTER_EMAIL": AUTHOR[1], **(env or {})}
        r = subprocess.run(["git", "--git-dir", str(self.path), *FSYNC_CONFIG, *args], input=stdin, capture_output=True,
                           text=True, env=full_env, timeout=60)
        if check and r.returncode != 0:
            raise LineageError(f"git {args[0]} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def resolve(self, ref: str) -> str | None:
        r = self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return r.stdout.strip() or None

    def has_commit(self, sha: str) -> bool:
        return bool(sha) and self.resolve(sha) is not None

    def is_ancestor(self, old: str, new: str) -> bool:
        return self._git("merge-base", "--is-ancestor", old, new, check=False).returncode == 0

    def parents(self, sha: str) -> list[str]:
        return self._git("rev-list", "--parents", "-n", "1", sha).stdout.split()[1:]

    def message(self, sha: str) -> str:
        return self._git("log", "-1", "--format=%B", sha).stdout

    def _git_bytes(self, *args: str) -> bytes:
        """`git args` as raw bytes: text mode's universal newlines turned a stored CRLF into LF (found by review)."""
        r = subprocess.run(["git", "--git-dir", str(self.path), *args], capture_output=True, timeout=60)
        if r.returncode != 0:
            raise LineageError(f"git {args[0]} failed: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    def files_at(self, sha: str, names: list[str] | None = None) -> dict[str, str]:
        """File contents at a commit (all files, or just `names`), byte for byte. `-z`: without it ls-tree quotes a
        name outside ASCII ("caf\\303\\251.py"), which then named no file."""
        listing = [n.decode("utf-8", errors="surrogateescape")
                   for n in self._git_bytes("ls-tree", "-r", "-z", "--name-only", sha).split(b"\0") if n]
        out: dict[str, str] = {}
        for name in listing:
            if names is not None and name not in names:
                continue
            data = self._git_bytes("cat-file", "blob", f"{sha}:{name}")
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise LineageError(f"{name} at {sha[:12]} is not UTF-8 text") from None
        return out

    # ---- objects, written in-process ----
    def _store(self, kind: bytes, data: bytes) -> bytes:
        """Write one loose object and make it durable: the database records a candidate's commit right after
        this returns, so an object still in the page cache at a power cut would leave a queued experiment whose
        commit no longer exists (gitdb writes a temp file and renames it, with no fsync)."""
        digest = hashlib.sha1(b"%s %d\0" % (kind, len(data)) + data).hexdigest()  # where gitdb will put it
        made = _missing_dirs(self.path / "objects" / digest[:2] / digest[2:])
        binsha = bytes(self._loose.store(IStream(kind, len(data), io.BytesIO(data))).binsha)
        hexsha = binsha.hex()
        _fsync_file(self.path / "objects" / hexsha[:2] / hexsha[2:], made if hexsha == digest else [])
        return binsha

    def _read(self, binsha: bytes, kind: bytes) -> bytes:
        with self._read_lock:  # one `git cat-file --batch` pipe per repository object
            info = self.repo.odb.stream(binsha)
            data = bytes(info.read())
        if info.type != kind:
            raise LineageError(f"{binsha.hex()[:12]} is a {info.type.decode()}, not a {kind.decode()}")
        return data

    def _tree_entries(self, binsha: bytes) -> dict[bytes, tuple[bytes, bytes]]:
        data, out, i = self._read(binsha, b"tree"), {}, 0
        while i < len(data):
            space = data.index(b" ", i)
            nul = data.index(b"\0", space)
            out[data[space + 1:nul]] = (data[i:space], data[nul + 1:nul + 21])
            i = nul + 21
        return out

    def _write_tree(self, base: bytes | None, files: dict[str, bytes]) -> bytes:
        """`base` (a tree id, or None for empty) with `files` (path -> content) written over it."""
        entries = self._tree_entries(base) if base else {}
        subdirs: dict[str, dict[str, bytes]] = {}
        for path, data in files.items():
            head, _, rest = path.partition("/")
            if not head or head in (".", "..") or (rest == "" and path.endswith("/")):
                raise LineageError(f"bad file path {path!r}")
            if rest:
                subdirs.setdefault(head, {})[rest] = data
            else:
                entries[head.encode()] = (b"100644", self._store(b"blob", data))
        for name, sub in subdirs.items():
            old = entries.get(name.encode())
            entries[name.encode()] = (b"40000", self._write_tree(old[1] if old and old[0] == b"40000" else None,
                                                                 sub))
        # git's order: byte order of names, a tree's name compared as if it ended in "/"
        order = sorted(entries, key=lambda n: n + b"/" if entries[n][0] == b"40000" else n)
        return self._store(b"tree", b"".join(entries[n][0] + b" " + n + b"\0" + entries[n][1] for n in order))

    def _commit_parts(self, sha: str) -> tuple[str, list[str]]:
        """(tree, parents) of a commit, from its object."""
        header = self._read(bytes.fromhex(sha), b"commit").partition(b"\n\n")[0]
        tree, parents = "", []
        for line in header.split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"tree":
                tree = value.decode()
            elif key == b"parent":
                parents.append(value.decode())
        return tree, parents

    def _tree_for(self, files: dict[str, str], parent: str | None) -> bytes:
        """The tree of `parent` (or an empty one) with `files` written over it."""
        base = bytes.fromhex(self._commit_parts(parent)[0]) if parent else None
        return self._write_tree(base, {n: t.encode("utf-8") for n, t in files.items()})

    def commit(self, files: dict[str, str], *, parent: str | None, message: str) -> str:
        """A commit of `parent`'s tree (or an empty one) with `files` written over it."""
        tree = self._tree_for(files, parent)
        who = f"{AUTHOR[0]} <{AUTHOR[1]}> {int(time.time())} +0000".encode()
        body = b"tree " + tree.hex().encode() + b"\n"
        if parent:
            body += b"parent " + parent.encode() + b"\n"
        body += b"author " + who + b"\ncommitter " + who + b"\n\n" + message.encode("utf-8")
        return self._store(b"commit", body).hex()

    def _create_ref(self, ref: str, sha: str) -> str:
        """Create `ref` at `sha` unless it exists; return what it points at."""
        r = self._git("update-ref", ref, sha, "0" * 40, check=False)
        if r.returncode != 0:
            existing = self.resolve(ref)
            if existing is None:
                raise LineageError(f"cannot create {ref}: {r.stderr.strip()}")
            return existing
        return sha

    def _set_aside(self, ref: str, sha: str, why: str) -> None:
        """Move a ref this database did not make (another database's, with the same farm home: a fresh database
        restarts experiment ids and slugs) out of the way, keeping its commits reachable."""
        aside = f"refs/superseded/{ref.removeprefix('refs/')}/{sha[:12]}"
        self._git("update-ref", aside, sha)
        self._git("update-ref", "-d", ref, sha)
        log.warning("%s was at %s, %s: kept as %s", ref, sha[:12], why, aside)

    # ---- programs and candidates ----
    def create_root(self, slug: str, files: dict[str, str], *, message: str) -> str:
        """The program's branch with the template as its first commit. An existing branch is reused only if it is
        that commit alone (this database made it and crashed before recording it); one with history, or another
        tree, is another database's program of the same slug (found by review: the new program's keeps then failed
        to fast-forward it, every pass): set aside, and a new root made."""
        ref = branch_ref(slug)
        existing = self.resolve(ref)
        if existing is not None:
            try:
                root: str | None = self._root_of(existing)
            except LineageError:
                root = None
            if existing == root and self._commit_parts(root)[0] == self._tree_for(files, None).hex():
                return root
            self._set_aside(ref, existing, "a branch this database did not make")
        return self._create_ref(ref, self.commit(files, parent=None, message=message))

    def _root_of(self, sha: str) -> str:
        roots = self._git("rev-list", "--max-parents=0", sha).stdout.split()
        if len(roots) != 1:
            raise LineageError(f"{sha} does not have exactly one root commit")
        return roots[0]

    def _readable(self) -> bool:
        return (self.path / "objects").is_dir() and (self.path / "HEAD").is_file()

    def commit_candidate(self, slug: str, experiment_id: int, files: dict[str, str], *, parent: str,
                         message: str) -> str:
        """The candidate's commit on its own ref; a second call returns the first commit. An existing ref is that
        commit only if it holds these files on this parent: otherwise it is another database's experiment of the
        same id (found by review: a fresh database next to an old repository trained one change and recorded
        another's commit), set aside. LineageUnavailable: the repository could not be used now, try again."""
        ref = candidate_ref(slug, experiment_id)
        existing = self._ref_in_process(ref)
        if existing is not None:
            tree, parents = self._commit_parts(existing)
            if parents == [parent] and tree == self._tree_for(files, parent).hex():
                return existing
            self._set_aside(ref, existing, "another change than this experiment's")
        try:
            with self._read_lock:
                if self.repo.odb.info(bytes.fromhex(parent)).type != b"commit":
                    raise ValueError(parent)
        except ValueError:
            if not self._readable():
                raise LineageUnavailable(f"the farm repository {self.path} cannot be read") from None
            raise LineageError(f"parent commit {parent[:12]} is not in the farm repository") from None
        try:
            sha = self.commit(files, parent=parent, message=message)
        except OSError as exc:  # disk full, the repository moved away meanwhile
            raise LineageUnavailable(f"cannot write to the farm repository: {exc}") from None
        for attempt in (1, 2):
            try:  # a new ref, created with a lock file and a rename (GitPython), never over an existing one
                made = _missing_dirs(self.path / ref)
                with self._read_lock:  # GitPython may look the object up through the shared cat-file pipe
                    git.Reference.create(self.repo, ref, sha, force=False)
                _fsync_file(self.path / ref, made)  # the ref keeps the commit reachable (gc prunes the rest)
                return sha
            except OSError:
                existing = self._ref_in_process(ref)
                if existing is not None:
                    return existing
                lock = self.path / f"{ref}.lock"
                # under the repository lock nothing else writes refs: a lock file left by a scheduler killed
                # inside Reference.create would refuse this ref for ever (found by review)
                if attempt == 1 and self._lock_fd is not None and lock.is_file():
                    log.warning("removing %s, left by a process that stopped while creating the ref", lock)
                    lock.unlink(missing_ok=True)
                    continue
                raise LineageUnavailable(f"cannot create {ref}") from None
        raise AssertionError("unreachable")

    def commit_candidates(self, items: list[tuple[str, int, dict[str, str], str, str]]
                          ) -> list[str | LineageError]:
        """`commit_candidate` for many (slug, experiment id, files, parent, message) at once, the object
        and ref files written by a few threads (each is a file create and rename: I/O, not Python);
        per item the commit or the LineageError it raised."""
        def one(item: tuple[str, int, dict[str, str], str, str]) -> str | LineageError:
            slug, exp_id, files, parent, message = item
            try:
                return self.commit_candidate(slug, exp_id, files, parent=parent, message=message)
            except LineageError as exc:
                return exc
            except OSError as exc:  # the repository's files, read by GitPython: gone or unreadable now
                return LineageUnavailable(f"the farm repository cannot be used now: {exc}")

        if len(items) <= 1:
            return [one(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(8, len(items)), thread_name_prefix="git-write") as pool:
            return list(pool.map(one, items))

    def _ref_in_process(self, ref: str) -> str | None:
        r = git.Reference(self.repo, ref, check_path=False)
        with self._read_lock:
            try:
                return str(r.commit.hexsha) if r.is_valid() else None
            except ValueError:
                return None

    def branch_head(self, slug: str) -> str | None:
        return self.resolve(branch_ref(slug))

    def advance(self, slug: str, new: str, *, expected: str | None) -> None:
        """Fast-forward the branch from `expected` to `new` (compare-and-set); never rewinds."""
        ref = branch_ref(slug)
        current = self.resolve(ref)
        if current == new:
            return
        if current != expected:
            raise LineageError(f"{ref} is at {str(current)[:12]}, expected {str(expected)[:12]}")
        if current is not None and not self.is_ancestor(current, new):
            raise LineageError(f"{ref}: {new[:12]} is not a fast-forward of {current[:12]}")
        self._git("update-ref", "-m", "farm: keep", ref, new, current or "0" * 40)

    def sync_branch(self, slug: str, db_head: str) -> bool:
        """Make the branch point at the database's head. True if it moved. Refuses to rewind."""
        current = self.resolve(branch_ref(slug))
        if current == db_head:
            return False
        if not self.has_commit(db_head):
            raise LineageError(f"database head {db_head[:12]} of {slug} is not in the farm repository")
        self.advance(slug, db_head, expected=current)
        return True

    def replay(self, *, base: str, change: str, onto: str, names: list[str]) -> ReplayResult:
        """3-way apply of `base`..`change` onto `onto`, per editable file (git merge-file)."""
        base_f, change_f, onto_f = (self.files_at(c, names) for c in (base, change, onto))
        out: dict[str, str] = {}
        conflicts: list[str] = []
        with tempfile.TemporaryDirectory(prefix="farm-replay-") as tmp:
            for name in names:
                b, c, o = base_f.get(name, ""), change_f.get(name, ""), onto_f.get(name, "")
                if b == c:
                    out[name] = o
                    continue
                paths = []
                for tag, text in (("ours", o), ("base", b), ("theirs", c)):
                    p = Path(tmp) / f"{tag}"
                    p.write_bytes(text.encode("utf-8"))  # bytes both ways: line endings as they are
                    paths.append(str(p))
                r = subprocess.run(["git", "merge-file", "-p", "-L", "head", "-L", "parent", "-L", "candidate",
                                    *paths], capture_output=True, timeout=60)
                if r.returncode < 0 or r.returncode > 127:
                    raise LineageError(f"git merge-file failed on {name}: {r.stderr.decode(errors='replace').strip()}")
                if r.returncode > 0:
                    conflicts.append(name)
                out[name] = r.stdout.decode("utf-8")
        return ReplayResult(files={} if conflicts else out, conflicts=conflicts)

    def add_note(self, sha: str, text: str) -> None:
        """Attach (or replace) the metrics note of a commit; notes never change the commit itself."""
        self._git("notes", "add", "-f", "-m", text.strip(), sha)

    def maintain(self) -> None:
        """`git gc --auto`: objects are written loose, three or more per candidate, and nothing packed them (100,000
        experiments left 300,000+ files in objects/; found by review). Packs them when git's own threshold says so;
        unreachable objects younger than two weeks are kept, so a commit whose ref is still to come is safe."""
        r = self._git("-c", "gc.autoDetach=false", "gc", "--auto", "--quiet", check=False)  # in the caller's thread
        if r.returncode != 0:
            log.warning("git gc --auto in %s failed: %s", self.path, r.stderr.strip()[:300])

    def noted_commits(self) -> set[str]:
        """Every commit that has a note (`git notes list`: one line per note, the note's blob then the commit)."""
        return {line.split()[1] for line in self._git("notes", "list").stdout.splitlines() if len(line.split()) == 2}

    def note(self, sha: str) -> str:
        r = self._git("notes", "show", sha, check=False)
        return r.stdout if r.returncode == 0 else ""
