"""Files made once and shared: a tokenized corpus, a decoded image dataset.

Preparing a large dataset (tokenizing a corpus, decoding millions of images) is slow, and
holding the result in each rank's memory costs one copy per rank. So one process writes it once
into a folder, under a key over everything that decides its content, and every rank then
memory-maps it read-only: the ranks of a machine share one copy in the page cache, and a
resumed or requeued run starts at once.

What every such file needs is here: a key, an fcntl lock so that processes sharing a folder
take turns (one builds, the others wait), temporary names that say which machine and process
writes them, and publishing by hard link so that an interrupted build leaves nothing that could
pass for a finished file and a finished file is never replaced (other runs may have it mapped).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from metabolic.data.idx import DatasetMissingError
from metabolic.engine.config import ConfigError

PROGRESS_EVERY_S = 30.0
"""Seconds between progress lines while a file is built."""
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
"""lockf errors of file systems without locks (NFS with nolock, Lustre without flock, some FUSE)."""
WAIT_POLL_S = 5.0
"""Seconds between looks at a folder where another process is building."""
VISIBLE_WAIT_S = 90.0
"""How long a rank looks for the files rank 0 finished (NFS may cache a name's absence for 60 s)."""


class Interrupted(Exception):
    """A stop signal arrived while the data was being prepared (nothing half-made passes for finished)."""


def digest(desc: dict) -> str:
    """A short stable name for a JSON-able description."""
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def file_stats(files: Iterable[Path]) -> list[list]:
    """[resolved path, size, mtime in ns] of each file: a changed file gives a new key."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def dataset_source(path: Optional[str], hub_name: Optional[str], exclude: Iterable[Path] = ()) -> dict:
    """What decides a Hugging Face dataset's content, for a key: its local files (names relative to
    `path`, so a copy made with its times kept, e.g. to a node's scratch disk, keeps the key) with
    their size and modification time, or its hub name (a changed hub dataset is not noticed).
    Files under `exclude` (the run's or cache's own folders, when they lie inside `path`) and
    builds in progress do not count."""
    if not (path and Path(path).exists()):
        return {"hf_name": hub_name}
    root = Path(path)
    inside = root.resolve()
    # Only folders inside the dataset's: one that holds the dataset (a cache_dir above data.path)
    # would hide every file and give every dataset there the same key.
    skip = [e for e in (Path(e).resolve() for e in exclude) if e != inside and e.is_relative_to(inside)]
    files = []
    for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
        try:
            if ".tmp-" in f.name or any(f.resolve().is_relative_to(e) for e in skip) or not f.is_file():
                continue
            st = f.stat()
        except OSError:  # gone since the listing (another run's temporary file)
            continue
        files.append([f.relative_to(root).as_posix() if root.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    if not files:
        raise DatasetMissingError(f"data.path '{path}' holds no files")
    return {"files": files}


def folder_of(cache_dir: Optional[str], run_dir: Path, default: str) -> tuple[Path, str]:
    """(the folder prepared files go in, the config key that names it): data.cache_dir, shared by
    runs, or the run's own `default` subfolder."""
    if cache_dir:
        return Path(cache_dir).expanduser(), "data.cache_dir"
    return run_dir / default, "output_dir"


@contextlib.contextmanager
def folder_ready(folder: Path, config_key: str, shared: bool, reads_from: Optional[str] = None) -> Iterator[Path]:
    """Create `folder` (a ConfigError naming `config_key` when it cannot be, or when the block
    cannot write a file in it: no permission, a read-only or full disk, a quota; files under
    `reads_from`, the data's own path, are not the folder's fault); folders created here that are
    still empty at the end are removed again, unless `shared` (other runs may be filling a shared
    folder at the same time)."""
    made = [] if shared else [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"config key '{config_key}': cannot create '{folder}' ({err})") from err
        try:
            yield folder
        except OSError as err:
            if not _cannot_write_in(err, folder, reads_from):
                raise
            raise ConfigError(f"config key '{config_key}': cannot write in '{folder}' ({err})") from err
    finally:
        for p in made:  # deepest first; only empty folders go
            with contextlib.suppress(OSError):
                p.rmdir()


def _cannot_write_in(err: OSError, folder: Path, reads_from: Optional[str]) -> bool:
    if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return False
    if not isinstance(err.filename, (str, os.PathLike)):
        return False
    path = Path(err.filename).resolve()
    own = path.is_relative_to(folder.resolve())
    return own and not (reads_from and path.is_relative_to(Path(reads_from).resolve()))


def wait_visible(is_built: Callable[[], bool], folder: Path, config_key: str, what: str,
                 wait_s: float = VISIBLE_WAIT_S) -> None:
    """On a rank other than the builder's: wait until the finished files show (a network file
    system may show them late); a DatasetMissingError naming `config_key` if they do not."""
    deadline = time.monotonic() + wait_s
    while not is_built():
        if time.monotonic() > deadline:
            raise DatasetMissingError(f"config key '{config_key}': rank 0 {what} into '{folder}', which this "
                                      "rank does not see; use a folder every machine shares")
        time.sleep(0.5)


def map_readonly(path: Path, dtype: np.dtype, shape: tuple, record: Path) -> np.ndarray:
    """`path` as an array of `shape`, memory-mapped read-only and shared: its pages are the page
    cache's, one copy per machine, and the map is not counted against the memory commit limit
    (a writable private map is, at the file's full size, so it fails for files larger than memory).
    Its size is checked against what `record` says first."""
    dtype = np.dtype(dtype)
    want, size = int(np.prod(shape)) * dtype.itemsize, path.stat().st_size
    if size != want:
        raise DatasetMissingError(f"{path}: {size:,} bytes where its record {record.name} says {want:,} "
                                  f"({'x'.join(map(str, shape))} {dtype.name}); delete the files "
                                  f"{record.stem}.* to build them again")
    if want == 0:
        return np.empty(shape, dtype=dtype)  # mmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def log(msg: str) -> None:
    print(f"[metabolic] {msg}", file=sys.stderr, flush=True)


def lock_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.lock"


def prepare(folder: Path, key: str, is_built: Callable[[], bool], build: Callable[[], object],
            should_stop: Callable[[], bool], doing: str) -> None:
    """Make sure the finished files of `key` are in `folder`: `build()` them while holding the
    folder's lock for `key`, or wait while another process holds it. `doing` says what a build
    does, for the messages ("tokenizing the corpus at ...")."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_built():
        return
    with locked(lock_path(folder, key), should_stop, doing) as held:
        if not is_built():
            for old in folder.glob(f"{key}.*.tmp-*") if held else ():
                if dead_here(old):  # a killed builder's; locks that hold on one machine only do not prove more
                    old.unlink(missing_ok=True)
                else:
                    with contextlib.suppress(OSError):
                        log(f"left in place: {old} ({old.stat().st_size:,} bytes), a build by another machine or a "
                            "live process; delete it once no run uses this folder")
            build()


@contextlib.contextmanager
def locked(lock: Path, should_stop: Callable[[], bool], doing: str) -> Iterator[bool]:
    """Hold an exclusive fcntl lock on `lock` (yields True; False on a file system without locks):
    released by the kernel when the holder dies, so no lock outlives its process (on NFS, through
    its lock manager). The holder removes the file before releasing it; a waiter that then holds
    the removed file's lock tries again."""
    fd = _acquire(lock, should_stop, doing)
    if fd is None:  # go on without taking turns (publishing is still safe)
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield True
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, should_stop: Callable[[], bool], doing: str) -> Optional[int]:
    """The descriptor of `lock` once this process holds its lock, waiting while another holds it;
    None on a file system without locks."""
    waited = None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:
                log(f"no file locks on the file system of {lock} ({err.strerror}); {doing} without taking turns")
                with contextlib.suppress(OSError):
                    if lock.stat().st_size == 0:  # ours, never held (a holder writes its name into it)
                        lock.unlink()
                return None
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # not "someone holds it"
                raise
            if should_stop():
                raise Interrupted(f"stopped while waiting for another process {doing}") from None
            if waited is None or time.monotonic() - waited >= 60:
                waited = time.monotonic()
                log(f"waiting for another process {doing} (it holds {lock})")
            time.sleep(WAIT_POLL_S)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except OSError:  # removed by its last holder (or a stale handle): try again
            same = False
        if same:
            return fd
        os.close(fd)


def tmp_name(final: Path) -> Path:
    """A name no other builder uses, saying which machine and process writes it."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def dead_here(tmp: Path) -> bool:
    """Whether `tmp` was written by a process of this machine that no longer runs."""
    try:
        host, pid, _ = tmp.name.split(".tmp-", 1)[1].rsplit("-", 2)
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False
    return False


def publish(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final` unless a file has it already: a finished file is never replaced
    (runs may have it mapped; on NFS a replaced file's pages go stale under them)."""
    try:
        os.link(tmp, final)  # fails, atomically, when `final` exists
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not final.exists():
            os.replace(tmp, final)


@contextlib.contextmanager
def writing(final: Path) -> Iterator[Path]:
    """A temporary path to write `final`'s content to; published as `final` when the block ends
    without an error, removed in every case."""
    tmp = tmp_name(final)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_record(final: Path, record: dict, replace: bool = False) -> None:
    """Write a JSON record, the last file of a build (its presence says the build finished);
    `replace`: an existing record is replaced (a progress record, newer than the one it replaces),
    else kept (a finished build's)."""
    if not replace:
        with writing(final) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        return
    tmp = tmp_name(final)
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class Progress:
    """Prints a line at most every PROGRESS_EVERY_S seconds while something long runs."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last < PROGRESS_EVERY_S:
            return False
        self.last = time.monotonic()
        return True

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start
