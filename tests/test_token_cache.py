"""The token cache: a corpus tokenized once into a flat file, memory-mapped by every rank and run."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, metabolic, ok, stop_when_logged, summary, torchrun
from metabolic.data import DatasetMissingError, file_cache, token_cache
from metabolic.data.text import corpus_source, iter_documents, pack, shakespeare_files, split_train_val
from metabolic.data.token_cache import TokenRows
from metabolic.data.tokenizer import byte_tokenizer, train_bpe

LM_CONFIG = REPO / "configs" / "lm_tiny.yaml"


@pytest.fixture()
def corpus(tmp_path):
    """Three short local text files (their own copy: tests change them)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = shakespeare_files()[0].read_text(encoding="utf-8", errors="replace")
    for i in range(3):
        (folder / f"part{i}.txt").write_text(text[i * 7000:(i + 1) * 7000 - 1000 * i])
    return folder


def key_of(corpus, tok, max_tokens=None):
    return token_cache.cache_key(corpus_source("files", str(corpus)), tok, max_tokens)


def encoded(corpus, tok):
    return (tok(d, add_special_tokens=False)["input_ids"] for d in iter_documents("files", str(corpus)))


def test_token_file_holds_the_stream_pack_would_make(tmp_path, corpus):
    tok = byte_tokenizer()
    folder, key = tmp_path / "cache", key_of(corpus, tok)
    record = token_cache.build(folder, key, iter_documents("files", str(corpus)), tok)
    stream = token_cache.open_tokens(folder, key)
    assert stream.dtype == np.uint16 and record["num_tokens"] == stream.shape[0] and record["documents"] == 3
    assert stream.shape[0] == sum(len(d.encode()) + 1 for d in iter_documents("files", str(corpus)))
    for seq_len in (32, 100):  # one file serves every sequence length
        expect = pack(encoded(corpus, tok), seq_len, tok.eos_token_id)
        rows = TokenRows.pack(stream, seq_len)
        assert rows.shape == expect.shape and torch.equal(rows.load(), expect)
        train, val = split_train_val(rows, 0.1)
        ref_train, ref_val = split_train_val(expect, 0.1)
        assert torch.equal(train.load(), ref_train) and torch.equal(val.load(), ref_val)


def test_capped_build_stops_where_pack_stops(tmp_path, corpus):
    tok = byte_tokenizer()
    cap = 50  # sequences of 32 tokens: reached inside the first document
    folder, key = tmp_path / "cache", key_of(corpus, tok, cap * 32)
    record = token_cache.build(folder, key, iter_documents("files", str(corpus)), tok, max_tokens=cap * 32)
    assert record["documents"] == 1
    rows = TokenRows.pack(token_cache.open_tokens(folder, key), 32, cap)
    assert torch.equal(rows.load(), pack(encoded(corpus, tok), 32, tok.eos_token_id, max_sequences=cap))
    assert key != key_of(corpus, tok)  # a capped file is not mistaken for the whole corpus


def test_rows_read_only_what_is_indexed(tmp_path, corpus):
    tok = byte_tokenizer()
    folder, key = tmp_path / "cache", key_of(corpus, tok)
    token_cache.build(folder, key, iter_documents("files", str(corpus)), tok)
    rows = TokenRows.pack(token_cache.open_tokens(folder, key), 16)
    full = rows.load()
    idx = torch.tensor([5, 0, 5, len(rows) - 1])
    got = rows[idx]
    assert got.dtype == torch.int64 and torch.equal(got, full[idx])
    assert isinstance(rows[2:9], TokenRows) and torch.equal(rows[2:9].load(), full[2:9])
    assert torch.equal(rows.token_counts(257, chunk_tokens=100), torch.bincount(full.reshape(-1), minlength=257))


class WideTokenizer:
    """A tokenizer with ids past 2^16 (real ones with such vocabularies are hub downloads):
    each character maps to 65,000 + its code point."""

    eos_token_id = 69_999

    def __len__(self) -> int:
        return 70_000

    def get_vocab(self) -> dict:
        return {"wide": 70_000}

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[65_000 + min(ord(c), 4_000) for c in d] for d in docs]}


def test_vocabularies_past_16_bits_are_stored_in_32(tmp_path):
    assert token_cache.token_dtype(50_257) == np.uint16 and token_cache.token_dtype(65_536) == np.uint16
    assert token_cache.token_dtype(65_537) == np.uint32
    tok = WideTokenizer()
    token_cache.build(tmp_path, "k", ["ab", "c"], tok)
    stream = token_cache.open_tokens(tmp_path, "k")
    assert stream.dtype == np.uint32 and stream.tolist() == [65_097, 65_098, 69_999, 65_099, 69_999]


def test_key_changes_with_the_corpus_files_and_the_tokenizer(tmp_path, corpus):
    byte = byte_tokenizer()
    key = key_of(corpus, byte)
    assert key_of(corpus, byte_tokenizer()) == key
    texts = list(iter_documents("files", str(corpus)))
    bpe = train_bpe(texts, 300)
    bpe.save_pretrained(str(tmp_path / "tok"))
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert key_of(corpus, reloaded) == key_of(corpus, bpe) != key  # a resumed run finds its file
    assert key_of(corpus, train_bpe(texts, 280)) != key_of(corpus, bpe)
    (corpus / "part1.txt").write_text(texts[1] + " More.")
    edited = key_of(corpus, byte)
    (corpus / "part3.txt").write_text("A new file.")
    assert len({key, edited, key_of(corpus, byte)}) == 3


def test_key_follows_the_end_of_text_token(tmp_path, corpus):
    # Same vocabulary and merges, another separator (a base model and its chat variant): another file.
    from transformers import PreTrainedTokenizerFast

    base = byte_tokenizer()
    chat = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<0x0A>")
    assert chat.eos_token_id != base.eos_token_id and key_of(corpus, chat) != key_of(corpus, base)
    token_cache.build(tmp_path, "k", ["ab"], base)
    with pytest.raises(DatasetMissingError, match="end-of-text 256"):
        token_cache.open_tokens(tmp_path, "k", chat)


HOLD_LOCK = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
left = f"{sys.argv[2]}.tmp-{socket.gethostname()}-{os.getpid()}-deadbeef"
open(left, "w").write("half a corpus")  # what a builder killed mid-way leaves
print(left, flush=True)
time.sleep(600)
"""


def test_builders_sharing_a_folder_take_turns(tmp_path, corpus, monkeypatch):
    import subprocess
    import sys

    tok = byte_tokenizer()
    folder, key = tmp_path / "cache", key_of(corpus, tok)
    folder.mkdir()
    lock = token_cache.lock_path(folder, key)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), str(folder / f"{key}.tokens")],
                              stdout=subprocess.PIPE, text=True)
    elsewhere = folder / f"{key}.tokens.tmp-another-host-{os.getpid()}-0000"  # maybe alive: not ours to judge
    elsewhere.write_text("another machine's build")
    try:
        leftover = Path(holder.stdout.readline().strip())
        assert leftover.is_file()
        monkeypatch.setattr(file_cache, "WAIT_POLL_S", 0.01)
        looks = []

        def stop_after_three_looks() -> bool:
            looks.append(1)
            return len(looks) > 3

        docs = lambda: iter_documents("files", str(corpus))  # noqa: E731
        with pytest.raises(token_cache.Interrupted, match="waiting for another process"):
            token_cache.prepare(folder, key, docs, tok, should_stop=stop_after_three_looks)
        assert len(looks) == 4 and not token_cache.is_built(folder, key)
    finally:
        holder.kill()  # SIGKILL: no cleanup ran, the kernel released its lock
        holder.wait()
    assert leftover.exists()
    token_cache.prepare(folder, key, docs, tok)
    assert not leftover.exists() and elsewhere.exists()
    elsewhere.unlink()
    assert token_cache.is_built(folder, key) and not lock.exists()
    first = (folder / f"{key}.tokens").stat().st_ino
    # A builder that finishes after another keeps the first file (runs may have it mapped).
    token_cache.build(folder, key, iter_documents("files", str(corpus)), tok)
    assert (folder / f"{key}.tokens").stat().st_ino == first
    assert sorted(os.listdir(folder)) == [f"{key}.json", f"{key}.tokens"]


def test_an_interrupted_build_leaves_nothing_that_passes_for_a_file(tmp_path, corpus):
    tok = byte_tokenizer()
    folder, key = tmp_path / "cache", key_of(corpus, tok)

    def dying():
        yield "Some text."
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        token_cache.build(folder, key, dying(), tok)
    assert not token_cache.is_built(folder, key) and os.listdir(folder) == []
    with pytest.raises(token_cache.Interrupted):  # a stop signal, seen between batches of documents
        token_cache.prepare(folder, key, lambda: iter_documents("files", str(corpus)), tok, should_stop=lambda: True)
    assert os.listdir(folder) == []  # neither the partial file nor the lock
    token_cache.build(folder, key, iter_documents("files", str(corpus)), tok)
    assert token_cache.is_built(folder, key) and sorted(os.listdir(folder)) == [f"{key}.json", f"{key}.tokens"]


def test_a_damaged_file_is_refused_naming_it(tmp_path, corpus):
    tok = byte_tokenizer()
    folder, key = tmp_path / "cache", key_of(corpus, tok)
    token_cache.build(folder, key, iter_documents("files", str(corpus)), tok)
    path = folder / f"{key}.tokens"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    with pytest.raises(DatasetMissingError, match=f"{path}.*delete the files {key}.\\* to build them again"):
        token_cache.open_tokens(folder, key)


def lm_args(out, corpus, *extra):
    return [str(LM_CONFIG), f"output_dir={out}", "data.text.corpus=files", f"data.path={corpus}",
            "data.text.tokenizer=byte", "data.text.seq_len=32", "model.width=32", "model.depth=2", "model.heads=2",
            "data.limit=64", "data.eval_limit=16", "train.micro_batch_size=8", "train.eval_batch_size=8",
            "train.log_every=1", "train.max_steps=2", "train.warmup_steps=1", "train.progress=false", *extra]


def test_runs_share_a_cache_dir_and_tokenize_once(tmp_path, corpus):
    cache = tmp_path / "cache"
    first = ok(metabolic("train", *lm_args(tmp_path / "a", corpus, f"data.cache_dir={cache}")))
    assert "tokenizing the files corpus" in first.stderr
    second = ok(metabolic("train", *lm_args(tmp_path / "b", corpus, f"data.cache_dir={cache}")))
    assert "tokeniz" not in second.stderr
    assert len(list(cache.glob("*.tokens"))) == 1 and not (tmp_path / "b" / "tokens").exists()
    a, b = summary(tmp_path / "a"), summary(tmp_path / "b")
    assert a["eval/loss"] == b["eval/loss"] and a["data/unigram_entropy"] == b["data/unigram_entropy"] > 0
    # Without cache_dir the file goes in the run, where resume finds it.
    ok(metabolic("train", *lm_args(tmp_path / "c", corpus)))
    files = sorted(p.name for p in (tmp_path / "c" / "tokens").iterdir())
    assert files == sorted(p.name for p in cache.iterdir())
    assert summary(tmp_path / "c")["eval/loss"] == a["eval/loss"]


def test_runs_share_a_trained_bpe_tokenizer_through_the_cache_dir(tmp_path, corpus):
    cache = tmp_path / "cache"
    args = ("data.text.tokenizer=bpe", "data.text.vocab_size=300", f"data.cache_dir={cache}")
    first = ok(metabolic("train", *lm_args(tmp_path / "a", corpus, *args)))
    assert "training a BPE tokenizer of 300 ids" in first.stderr
    second = ok(metabolic("train", *lm_args(tmp_path / "b", corpus, *args)))
    assert "using the BPE tokenizer trained on this corpus before" in second.stderr
    assert "training a BPE" not in second.stderr and "tokenizing" not in second.stderr
    a, b = (tmp_path / r / "tokenizer" / "tokenizer.json" for r in "ab")
    assert a.read_text() == b.read_text()  # each run keeps its own copy, for hf_model and resume
    assert len(list(cache.glob("*.tokens"))) == 1 and len(list(cache.glob("bpe300-*/tokenizer.json"))) == 1
    assert summary(tmp_path / "a")["eval/loss"] == summary(tmp_path / "b")["eval/loss"]
    other = ok(metabolic("train", *lm_args(tmp_path / "c", corpus, *args[:1], "data.text.vocab_size=280", *args[2:])))
    assert "training a BPE tokenizer of 280 ids" in other.stderr and len(list(cache.glob("*.tokens"))) == 2


@pytest.mark.parametrize("ranks", [1, 2])
def test_an_unusable_cache_dir_is_a_config_error(tmp_path, corpus, ranks):
    # With two ranks, rank 0 tells rank 1 why it failed: no rank waits for a file that never comes.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tokenizer = "byte" if ranks == 1 else "bpe"  # bpe: rank 0 fails before tokenizing, while it prepares BPE
    args = lm_args(tmp_path / "run", corpus, f"data.cache_dir={blocker}/cache", f"data.text.tokenizer={tokenizer}",
                   "data.text.vocab_size=300")
    proc = metabolic("train", *args) if ranks == 1 else torchrun(2, "-m", "metabolic", "train", *args, timeout=300)
    assert proc.returncode != 0 and "data.cache_dir" in proc.stderr, proc.stderr[-3000:]
    if ranks == 1:
        assert proc.returncode == 2
    else:
        assert "rank 0 could not prepare the data: ConfigError: config key 'data.cache_dir'" in proc.stderr
    assert blocker.read_text() == "not a folder"


def test_ranks_wait_for_rank_0_past_the_collective_timeout():
    # Rank 0 may tokenize for hours; the others wait in a group whose timeout is not the 10-minute
    # one of the training collectives (here cut to 2 s, which the meta barrier shows is in force).
    proc = ok(torchrun(2, str(REPO / "tests" / "workers" / "setup_barrier_worker.py"), timeout=300))
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 4, proc.stdout
    assert lines[0].startswith("rank 0 meta barrier failed") and lines[1].startswith("rank 0 setup barrier passed")
    assert lines[2].startswith("rank 1 meta barrier failed") and lines[3].startswith("rank 1 setup barrier passed")
    assert float(lines[3].split("after ")[1].split(" s")[0]) >= 4.5  # it did wait out rank 0's 5 s


@pytest.mark.parametrize("signals,tokenizer", [("USR1", "byte"), ("INT INT", "byte"), ("USR1", "bpe")])
def test_a_stop_signal_while_tokenizing_exits_for_a_resume(tmp_path, signals, tokenizer):
    # SLURM's preemption notice, or Ctrl-C delivered twice at once by a launcher, during a long
    # tokenization or while BPE training reads the corpus: exit 75, leaving neither a partial file
    # nor a lock nor an empty run folder; the run started again prepares its data again.
    import signal

    corpus = tmp_path / "many"
    corpus.mkdir()
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in shakespeare_files()[:3])
    for i in range(400):  # ~5 MB in many documents: seconds to tokenize, checked between documents
        (corpus / f"doc{i:03d}.txt").write_text(text[(i * 12_000) % (len(text) - 12_000):][:12_000])
    out = tmp_path / "run"
    args = lm_args(out, corpus, "data.limit=null", f"data.text.tokenizer={tokenizer}", "data.text.vocab_size=300")
    starts, stopped = (("tokenizing the files corpus", "stopped while tokenizing") if tokenizer == "byte" else
                       ("training a BPE tokenizer", "stopped while training the BPE tokenizer"))
    code, err = stop_when_logged(args, starts, tuple(getattr(signal, f"SIG{name}") for name in signals.split()))
    assert code == 75, err[-3000:]
    assert stopped in err and "resume=true" in err
    assert not out.exists()  # nothing was written: no partial token file, no lock, no empty folders
    ok(metabolic("train", *args, "resume=true"))
    assert len(list((out / "tokens").glob("*.tokens"))) == 1 and summary(out)["step"] == 2


def test_rank_setup_passes_rank_0s_outcome_to_every_rank():
    # The protocol alone (the 2-rank runs above carry it over real gloo): what rank 0 shares is
    # what every other rank returns or raises, and the other ranks never run the work.
    from metabolic.data.idx import DatasetMissingError
    from metabolic.engine.rank_setup import RankSetup

    def never():
        raise AssertionError("only rank 0 works")

    assert RankSetup(False, share=lambda obj: {"value": 7}).on_rank0(never) == 7
    with pytest.raises(DatasetMissingError, match="rank 0 could not prepare the data: ConfigError: bad key"):
        RankSetup(False, share=lambda obj: {"error": "ConfigError: bad key"}).on_rank0(never)
    with pytest.raises(token_cache.Interrupted, match="stopped while tokenizing"):
        RankSetup(False, share=lambda obj: {"stopped": "stopped while tokenizing"}).on_rank0(never)
    sent = []
    with pytest.raises(ValueError):
        RankSetup(True, share=lambda obj: sent.append(obj) or obj).on_rank0(lambda: int("x"))
    assert sent == [{"error": "ValueError: invalid literal for int() with base 10: 'x'"}]
    assert RankSetup(True, share=lambda obj: sent.append(obj) or obj).on_rank0(lambda: "key") == "key"
    RankSetup(gather=lambda obj: [None, None]).agree(None)  # nobody has a problem
    with pytest.raises(DatasetMissingError, match="^rank 1: no file here$"):
        RankSetup(gather=lambda obj: [None, "no file here"]).agree(None)
    with pytest.raises(DatasetMissingError, match="^mine$"):
        RankSetup(gather=lambda obj: ["first", "mine"]).agree("mine")
