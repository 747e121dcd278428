"""Starting an LM run's data: tokenizing into memory against the token cache, same process.

Three ways to get the packed sequences of a corpus, each timed over --repeats runs (medians):
- in_memory: what every rank did before the cache: tokenize document by document and pack int64
  rows in its own memory (`text.pack`);
- build: the cache's first run: rank 0 tokenizes in batches into the uint16/uint32 token file;
- open: every other rank, and every later or resumed run: memory-map the file and cut the rows.
Also the median time to read one random training batch from the int64 tensor and from the
memory map, and the bytes each rank holds per token.

    python benchmarks/token_cache.py                       # the default corpus, lm_tiny's BPE
    python benchmarks/token_cache.py --tokenizer byte --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from timing import median_s  # benchmarks/timing.py

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from metabolic.data import token_cache
    from metabolic.data.text import corpus_source, iter_documents, pack
    from metabolic.data.token_cache import TokenRows
    from metabolic.data.tokenizer import byte_tokenizer, train_bpe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="shakespeare", help="shakespeare or files")
    p.add_argument("--path", default=None, help="corpus=files: a file, folder or glob")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "byte"])
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary (lm_tiny's)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="sequences per timed batch read")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)

    docs = lambda: iter_documents(a.corpus, a.path)  # noqa: E731
    tok = train_bpe(list(docs()), a.vocab_size) if a.tokenizer == "bpe" else byte_tokenizer()
    key = token_cache.cache_key(corpus_source(a.corpus, a.path), tok, None)

    def in_memory() -> torch.Tensor:
        return pack((tok(d, add_special_tokens=False)["input_ids"] for d in docs()), a.seq_len, tok.eos_token_id)

    with tempfile.TemporaryDirectory() as tmp:
        folders = iter(Path(tmp) / f"b{i}" for i in range(a.repeats))
        mem_s, rows_mem = median_s(in_memory, a.repeats)
        build_s, _ = median_s(lambda: token_cache.build(next(folders), key, docs(), tok), a.repeats)
        folder = Path(tmp) / "b0"
        open_s, rows = median_s(lambda: TokenRows.pack(token_cache.open_tokens(folder, key), a.seq_len), a.repeats)
        assert torch.equal(rows.load(), rows_mem), "the token file's rows differ from pack's"
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(rows), (a.batch,), generator=g) for _ in range(200)]
        read_mem = statistics.median(median_s(lambda: rows_mem[b], 1)[0] for b in batches)
        read_map = statistics.median(median_s(lambda: rows[b], 1)[0] for b in batches)
        file_bytes = (folder / f"{key}.tokens").stat().st_size
    tokens = rows_mem.numel()
    result = {"corpus": a.corpus, "tokenizer": a.tokenizer, "vocab_size": len(tok), "tokens": tokens,
              "in_memory_s": mem_s, "build_s": build_s, "open_s": open_s,
              "build_ratio": build_s / mem_s, "open_ratio": open_s / mem_s,
              "batch_read_ms": {"in_memory": read_mem * 1e3, "memory_map": read_map * 1e3},
              "bytes_per_token": {"in_memory_per_rank": rows_mem.element_size(),
                                  "token_file_per_machine": file_bytes / max(tokens, 1)}}
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{a.corpus} corpus, {a.tokenizer} tokenizer ({len(tok)} ids), {tokens:,} tokens in rows of {a.seq_len}; "
          f"medians of {a.repeats}")
    print("| path | seconds | x in_memory | bytes per token |")
    print("|---|---|---|---|")
    print(f"| in_memory (every rank, every start) | {mem_s:.3f} | 1.00 | {rows_mem.element_size()} per rank |")
    print(f"| build (rank 0, first run) | {build_s:.3f} | {build_s / mem_s:.2f} | "
          f"{file_bytes / max(tokens, 1):.0f} per machine (file) |")
    print(f"| open (other ranks, later runs, resume) | {open_s:.4f} | {open_s / mem_s:.1e} | shared page cache |")
    print(f"batch of {a.batch} random rows: {read_mem * 1e3:.3f} ms from the int64 tensor, "
          f"{read_map * 1e3:.3f} ms from the memory map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
