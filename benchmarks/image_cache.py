"""Starting an image run on a Hugging Face dataset: decoding into memory against the image cache.

The benchmark turns Fashion-MNIST's IDX training split into what users hold: a datasets
save_to_disk folder of PNG-encoded images with ClassLabel labels, or with --side S, of RGB JPEGs
of 1.25 S x S pixels that data.image_size=S resizes and crops, as an ImageNet-like folder needs
(made once, not timed). Then, each timed over --repeats runs (medians), the ways to get the
training split ready:
- in_memory: what every rank did before the cache, at every start: decode every image into a
  uint8 tensor in its own memory (`load_hf_split`) and sum the pixel statistics over it;
- build: the cache's first run: rank 0 decodes piece by piece into the pixel file, statistics
  summed on the way, with one thread and with one per core (data.decode_threads' default for
  images of 32 KiB or more);
- open: every other rank, and every later or resumed run: map the pixel file.
Also the median time to read one random normalised training batch (ImageArrays.batch) from the
tensor and from the map, and the bytes each rank holds.

    python benchmarks/image_cache.py                 # all 60,000 training images
    python benchmarks/image_cache.py --samples 5000 --side 224 --json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from timing import median_s  # benchmarks/timing.py

REPO = Path(__file__).resolve().parents[1]


def save_dataset(idx_folder: str, samples: int, side: int, out: Path) -> None:
    """The first `samples` training images of an IDX folder as a datasets folder: PNGs as they are,
    or (side > 0) RGB JPEGs of 1.25 side x side."""
    import datasets
    import PIL.Image

    from metabolic.data import load_idx_split

    split = load_idx_split(idx_folder, "train").head(samples)
    images = [PIL.Image.fromarray(im[0].numpy(), "L") for im in split.images]
    if side:
        images = [_jpeg(im.convert("RGB").resize((side * 5 // 4, side), PIL.Image.BILINEAR)) for im in images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": images, "label": split.labels.tolist()}, features=features)
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": ds}).save_to_disk(str(out))


def _jpeg(image) -> dict:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return {"bytes": buf.getvalue(), "path": None}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from metabolic.data import image_cache, load_hf_split, pixel_stats
    from metabolic.data.hf import MAX_THREADS, cores
    from metabolic.data.file_cache import dataset_source
    from metabolic.data.hf import open_hf_split

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx", default="/usr/share/datasets/fashion-mnist", help="IDX folder the images come from")
    p.add_argument("--samples", type=int, default=60000, help="training images (Fashion-MNIST has 60,000)")
    p.add_argument("--side", type=int, default=0, help="JPEGs resized to this size (0: the PNGs as they are)")
    p.add_argument("--batch", type=int, default=128, help="images per timed batch read")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data, size, threads = Path(tmp) / "dd", a.side or None, cores(MAX_THREADS)
        save_dataset(a.idx, a.samples, a.side, data)
        key = image_cache.cache_key(dataset_source(str(data), None), "train", "image", "label", size)

        def in_memory():
            split = load_hf_split("train", path=str(data), size=size)
            return split, pixel_stats(split.images)

        def build(folder: Path, n: int) -> dict:
            return image_cache.build(folder, key, open_hf_split("train", str(data)), "train", size=size, threads=n)

        folders = iter(Path(tmp) / f"b{i}" for i in range(2 * a.repeats))
        mem_s, (split_mem, stats_mem) = median_s(in_memory, a.repeats)
        build_s, record = median_s(lambda: build(next(folders), 1), a.repeats)
        threaded_s, _ = median_s(lambda: build(next(folders), threads), a.repeats)
        folder = Path(tmp) / f"b{a.repeats}"  # written by the threads
        open_s, (split_map, _) = median_s(lambda: image_cache.open_split(folder, key), a.repeats)
        assert torch.equal(split_map.images, split_mem.images), "the pixel file differs from the decoded images"
        assert filecmp.cmp(Path(tmp) / "b0" / f"{key}.images", folder / f"{key}.images", shallow=False), \
            "one thread and several wrote different pixel files"
        assert (tuple(record["mean"]), tuple(record["std"])) == stats_mem, "pixel statistics differ"
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(split_mem), (a.batch,), generator=g) for _ in range(200)]
        read_mem = statistics.median(median_s(lambda: split_mem.batch(b), 1)[0] for b in batches)
        read_map = statistics.median(median_s(lambda: split_map.batch(b), 1)[0] for b in batches)
        file_bytes = (folder / f"{key}.images").stat().st_size
    n = len(split_mem)
    result = {"samples": n, "sample_shape": list(split_mem.sample_shape), "threads": threads,
              "in_memory_s": mem_s, "build_s": build_s, "build_threads_s": threaded_s, "open_s": open_s,
              "build_ratio": build_s / mem_s, "build_threads_ratio": threaded_s / mem_s, "open_ratio": open_s / mem_s,
              "batch_read_ms": {"in_memory": read_mem * 1e3, "memory_map": read_map * 1e3},
              "bytes": {"in_memory_per_rank": int(split_mem.images.numel()), "pixel_file_per_machine": file_bytes}}
    if a.json:
        print(json.dumps(result))
        return 0
    kind = f"JPEG images resized to {tuple(split_mem.sample_shape)}" if a.side else f"PNG images {tuple(split_mem.sample_shape)}"
    print(f"{n:,} {kind} from {a.idx}; medians of {a.repeats}")
    print("| path | seconds | x in_memory | bytes held |")
    print("|---|---|---|---|")
    print(f"| in_memory (every rank, every start) | {mem_s:.3f} | 1.00 | {split_mem.images.numel():,} per rank |")
    print(f"| build (rank 0, first run), 1 thread | {build_s:.3f} | {build_s / mem_s:.2f} | "
          f"{file_bytes:,} per machine (file) |")
    print(f"| build, {threads} threads | {threaded_s:.3f} | {threaded_s / mem_s:.2f} | {file_bytes:,} per machine (file) |")
    print(f"| open (other ranks, later runs, resume) | {open_s:.4f} | {open_s / mem_s:.1e} | shared page cache |")
    print(f"batch of {a.batch} random images: {read_mem * 1e3:.3f} ms from the tensor, "
          f"{read_map * 1e3:.3f} ms from the map")
    return 0


if __name__ == "__main__":
    sys.exit(main())
