"""Tokenized corpora on disk: tokenize once, memory-map in every rank, every resume and every run.

Tokenizing is the slow part of starting a language-model run (hours for a large corpus), and
packed int64 tokens held in each rank's memory cost 8 bytes per token per rank. Instead rank 0
tokenizes the corpus once into a flat file of token ids (every document followed by the
end-of-text token; uint16 when the vocabulary fits, uint32 otherwise) and a JSON record of what
it holds; every rank then memory-maps the file read-only, so the ranks of a machine share one
copy in the page cache, and a resumed or requeued run starts at once.

A file is named by a key over everything that decides its content: the corpus, the size and
modification time of each of its files, the tokenizer (its serialised vocabulary and merges)
and, for a streamed corpus, how many tokens were read. Sequences of any length are cut from the
same file. A build writes under a temporary name and links it into place when done, so an
interrupted build leaves nothing that could pass for a finished file. Runs sharing a folder take
turns through a file lock: one tokenizes, the others wait for its file; a finished file is never
replaced (other runs may have it mapped).
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
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

FORMAT = 1
"""Bump when the file layout changes: the key includes it, so old files are not read."""
PROGRESS_EVERY_S = 30.0
"""Seconds between progress lines while a corpus is tokenized."""
WRITE_TOKENS = 1 << 20
"""Tokens buffered before each write."""
DOCS_PER_CALL = 64
"""Documents per tokenizer call (fast tokenizers encode a batch on several threads)."""
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
"""lockf errors of file systems without locks (NFS with nolock, Lustre without flock, some FUSE)."""
WAIT_POLL_S = 5.0
"""Seconds between looks at a folder where another process is tokenizing."""


class Interrupted(Exception):
    """A stop signal arrived while the corpus was being prepared; nothing half-made was kept."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"token cache: a vocabulary of {vocab_size:,} ids does not fit 32 bits")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the tokenizer's serialised form (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def cache_key(source: dict, tokenizer, max_tokens: Optional[int]) -> str:
    """Key of the token file for `source` (corpus description with its file stats) under `tokenizer`."""
    # The end-of-text id and length live in the tokenizer's wrapper, not in its serialised form.
    return digest({"format": FORMAT, "source": source, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "eot_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "max_tokens": max_tokens})


def digest(desc: dict) -> str:
    """A short stable name for a JSON-able description."""
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def paths(folder: Path, key: str) -> tuple[Path, Path]:
    """(token file, its JSON record) for `key` in `folder`."""
    return folder / f"{key}.tokens", folder / f"{key}.json"


def lock_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.lock"


def is_built(folder: Path, key: str) -> bool:
    """Whether a finished token file for `key` is in `folder` (the record is written last)."""
    tokens, record = paths(folder, key)
    return tokens.is_file() and record.is_file()


def _log(msg: str) -> None:
    print(f"[metabolic] {msg}", file=sys.stderr, flush=True)


def prepare(folder: Path, key: str, documents: Callable[[], Iterable[str]], tokenizer,
            max_tokens: Optional[int] = None, describe: str = "corpus",
            should_stop: Callable[[], bool] = lambda: False) -> None:
    """Make sure the finished token file for `key` is in `folder`: build it while holding the
    folder's lock for `key`, or wait while another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_built(folder, key):
        return
    with _locked(lock_path(folder, key), should_stop, describe) as held:
        if not is_built(folder, key):
            for old in folder.glob(f"{key}.*.tmp-*") if held else ():
                if _dead_here(old):  # a killed builder's; locks that hold on one machine only do not prove more
                    old.unlink(missing_ok=True)
            build(folder, key, documents(), tokenizer, max_tokens, describe, should_stop)


@contextlib.contextmanager
def _locked(lock: Path, should_stop: Callable[[], bool], describe: str) -> Iterator[bool]:
    """Hold an exclusive fcntl lock on `lock` (yields True; False on a file system without locks):
    released by the kernel when the holder dies, so no lock outlives its process (on NFS, through
    its lock manager). The holder removes the file before releasing it; a waiter that then holds
    the removed file's lock tries again."""
    waited = None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:  # go on without taking turns (publishing is still safe)
                _log(f"no file locks on the file system of {lock} ({err.strerror}); tokenizing without taking turns")
                yield False
                return
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # not "someone holds it"
                raise
            if should_stop():
                raise Interrupted(f"stopped while waiting for another process tokenizing {describe}") from None
            if waited is None or time.monotonic() - waited >= 60:
                waited = time.monotonic()
                _log(f"waiting for another process tokenizing {describe} (it holds {lock})")
            time.sleep(WAIT_POLL_S)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except OSError:  # removed by its last holder (or a stale handle): try again
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield True
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def build(folder: Path, key: str, documents: Iterable[str], tokenizer, max_tokens: Optional[int] = None,
          describe: str = "corpus", should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Tokenize `documents` into the token file for `key`; returns its record.

    Stops after the document that reaches `max_tokens` (as `text.pack` does with its cap).
    Prints a progress line every PROGRESS_EVERY_S seconds; raises
    Interrupted (removing what it wrote) once `should_stop()` is true. A file another builder
    finished meanwhile is kept, not replaced.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokens_path, record_path = paths(folder, key)
    dtype = token_dtype(len(tokenizer))
    eot = tokenizer.eos_token_id
    tmp = _tmp_name(tokens_path)
    _log(f"tokenizing {describe} into {tokens_path} (once; later runs and ranks memory-map it)")
    start = last = time.monotonic()
    total, docs, pending, buffered = 0, 0, [], 0
    try:
        with open(tmp, "wb") as f:
            for ids in _encoded(documents, tokenizer):
                if should_stop():
                    raise Interrupted(f"stopped while tokenizing {describe}; nothing was kept")
                pending.append(np.asarray(list(ids) + [eot], dtype=np.int64))
                buffered += pending[-1].size
                docs += 1
                done = max_tokens is not None and total + buffered >= max_tokens
                if buffered >= WRITE_TOKENS or done:
                    total += _write(f, pending, dtype)
                    pending, buffered = [], 0
                if done:
                    break
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    rate = (total + buffered) / max(last - start, 1e-9)
                    _log(f"tokenizing {describe}: {docs:,} documents, {total + buffered:,} tokens "
                         f"({rate:,.0f} tokens/s)")
            total += _write(f, pending, dtype)
        _publish(tmp, tokens_path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"format": FORMAT, "dtype": dtype.name, "num_tokens": total, "documents": docs,
              "vocab_size": len(tokenizer), "eot_id": eot, "source": describe, "max_tokens": max_tokens,
              "seconds": round(time.monotonic() - start, 3)}
    tmp_record = _tmp_name(record_path)
    tmp_record.write_text(json.dumps(record, indent=2) + "\n")
    try:
        _publish(tmp_record, record_path)
    finally:
        tmp_record.unlink(missing_ok=True)
    _log(f"tokenized {describe}: {docs:,} documents, {total:,} tokens in {record['seconds']:.1f} s")
    return record


def _tmp_name(final: Path) -> Path:
    """A name no other builder uses, saying which machine and process writes it."""
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _dead_here(tmp: Path) -> bool:
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


def _publish(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final` unless a file has it already: a finished file is never replaced
    (runs may have it mapped; on NFS a replaced file's pages go stale under them)."""
    try:
        os.link(tmp, final)  # fails, atomically, when `final` exists
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not final.exists():
            os.replace(tmp, final)


def _encoded(documents: Iterable[str], tokenizer) -> Iterable[Sequence[int]]:
    """Token ids of each document, in order, encoded DOCS_PER_CALL at a time."""
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == DOCS_PER_CALL:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def _write(f, parts: list[np.ndarray], dtype: np.dtype) -> int:
    if not parts:
        return 0
    ids = np.concatenate(parts)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token cache: token id {int(ids.max())} outside {dtype.name} (tokenizer's length is wrong)")
    f.write(ids.astype(dtype).tobytes())
    return int(ids.size)


def open_tokens(folder: Path, key: str, tokenizer=None) -> np.ndarray:
    """The flat token stream of a finished file, memory-mapped read-only (checked against
    `tokenizer` when given)."""
    tokens_path, record_path = paths(folder, key)
    record = json.loads(record_path.read_text())
    if tokenizer is not None and (record["vocab_size"], record["eot_id"]) != (len(tokenizer), tokenizer.eos_token_id):
        raise ValueError(f"token cache {tokens_path}: written for {record['vocab_size']} ids with end-of-text "
                         f"{record['eot_id']}, the tokenizer has {len(tokenizer)} and {tokenizer.eos_token_id}")
    dtype = np.dtype(record["dtype"])
    n = int(record["num_tokens"])
    size = tokens_path.stat().st_size
    if size != n * dtype.itemsize:
        raise ValueError(f"token cache {tokens_path}: {size:,} bytes where its record {record_path.name} says "
                         f"{n:,} {dtype.name} tokens; delete both files to tokenize the corpus again")
    if n == 0:
        return np.empty(0, dtype=dtype)  # mmap refuses empty files
    return np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n,))


class TokenRows:
    """Packed sequences [N, L] cut from a flat token stream, without copying it.

    Row i is tokens [i*L, (i+1)*L). Indexing with a tensor of row indices reads just those rows
    into an int64 tensor; a slice gives a view, as numpy's basic indexing does.
    """

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    @classmethod
    def pack(cls, stream: np.ndarray, seq_len: int, max_sequences: Optional[int] = None) -> "TokenRows":
        """Cut `stream` into whole rows of `seq_len`; the ragged tail is dropped."""
        n = stream.shape[0] // seq_len
        if max_sequences is not None:
            n = min(n, max_sequences)
        return cls(stream[: n * seq_len].reshape(n, seq_len))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.rows.shape)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return TokenRows(self.rows[key])
        idx = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        return torch.from_numpy(self.rows[idx].astype(np.int64))

    def load(self) -> torch.Tensor:
        """Every row as one int64 tensor (small corpora and tests)."""
        return torch.from_numpy(np.asarray(self.rows).astype(np.int64))

    def token_counts(self, vocab_size: int, chunk_tokens: int = 1 << 22) -> torch.Tensor:
        """How often each token id occurs, read about chunk_tokens at a time (600 M tokens/s on one core)."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        wide = np.int32 if self.rows.dtype.itemsize < 4 else np.int64  # bincount's fast path is int32
        step = max(1, chunk_tokens // max(self.rows.shape[1], 1))
        for start in range(0, len(self), step):
            chunk = torch.from_numpy(np.asarray(self.rows[start:start + step]).reshape(-1).astype(wide))
            counts += torch.bincount(chunk, minlength=vocab_size)[:vocab_size]
        return counts
