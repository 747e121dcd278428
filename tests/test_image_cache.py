"""The image cache: source=hf image datasets decoded once by rank 0 and memory-mapped everywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CONFIG, SMALL, metabolic, ok, stop_when_logged, summary, torchrun
from metabolic.data import DatasetMissingError, file_cache, image_cache, load_hf_split, pixel_stats
from metabolic.data.file_cache import dataset_source
from metabolic.data.hf import open_hf_split


def save_images(folder: Path, sizes=(("train", 90), ("test", 30)), mode: str = "RGB", side: int = 12,
                odd: int | None = None) -> Path:
    """A save_to_disk folder of PNG-encoded images (datasets' Image feature) with ClassLabel labels;
    `odd`: that training image gets another size."""
    import datasets
    import PIL.Image

    rng = np.random.default_rng(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    splits = {}
    for split, n in sizes:
        labels = rng.integers(0, 4, n)  # class 4 is declared but never used: the count comes from the feature
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        images = []
        for i, label in enumerate(labels):
            s = side + 2 if i == odd and split == "train" else side
            pixels = (rng.integers(0, 60, (s, s, channels)) + 40 * label).astype(np.uint8)
            images.append(PIL.Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode))
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def build_split(folder: Path, data: Path, split: str, **kw) -> tuple[str, dict]:
    key = image_cache.cache_key(dataset_source(str(data), None), split, "image", "label")
    ds = open_hf_split(split, str(data))
    return key, image_cache.build(folder, key, ds, split, **kw)


@pytest.mark.parametrize("mode,threads", [("RGB", 1), ("L", 3), ("RGBA", 2), ("RGB", 0)])
def test_cached_split_equals_the_split_decoded_in_memory(tmp_path, mode, threads, monkeypatch):
    import metabolic.data.hf as hf

    monkeypatch.setattr(hf, "CHUNK_ROWS", 16)  # several pieces, the last one short
    data = save_images(tmp_path / "dd", mode=mode)
    folder = tmp_path / "cache"
    key, record = build_split(folder, data, "train", threads=threads)
    cached, _ = image_cache.open_split(folder, key)
    direct = load_hf_split("train", path=str(data))
    assert cached.images.shape == direct.images.shape == (90, 1 if mode == "L" else 3, 12, 12)
    assert torch.equal(cached.images, direct.images) and torch.equal(cached.labels, direct.labels)
    assert cached.num_classes == direct.num_classes == 5
    # The pixel statistics were summed while decoding, piece by piece: the same as over the whole split.
    assert (tuple(record["mean"]), tuple(record["std"])) == pixel_stats(direct.images)
    # The pixels are mapped from the file, not read into memory.
    assert str(folder / f"{key}.images") in Path("/proc/self/maps").read_text()
    assert sorted(os.listdir(folder)) == sorted(f"{key}.{ext}" for ext in ("images", "labels", "json"))


def test_key_follows_the_files_the_split_and_the_columns(tmp_path):
    data = save_images(tmp_path / "dd")
    source = dataset_source(str(data), None)
    key = image_cache.cache_key(source, "train", "image", "label")
    assert key == image_cache.cache_key(dataset_source(str(data), None), "train", "image", "label")
    assert key != image_cache.cache_key(source, "test", "image", "label")
    assert key != image_cache.cache_key(source, "train", "img", "label")
    assert key != image_cache.cache_key(dataset_source(None, "org/name"), "train", "image", "label")
    # A copy that keeps the files' times (a job staging the data to its node's disk) keeps the key;
    # what a run writes inside the dataset's folder (its output_dir or cache) does not count.
    import shutil

    shutil.copytree(data, tmp_path / "staged")
    assert key == image_cache.cache_key(dataset_source(str(tmp_path / "staged"), None), "train", "image", "label")
    (data / "cache").mkdir()
    (data / "cache" / "x.images").write_bytes(b"pixels")
    (data / "y.images.tmp-host-1-abcd").write_bytes(b"a build in progress")
    assert key == image_cache.cache_key(dataset_source(str(data), None, exclude=[data / "cache"]), "train", "image",
                                        "label")
    # A cache folder that holds the dataset's folder hides nothing: two datasets there keep two keys.
    other = save_images(tmp_path / "other", sizes=(("train", 91), ("test", 30)))
    assert (image_cache.cache_key(dataset_source(str(data), None, exclude=[tmp_path]), "train", "image", "label")
            != image_cache.cache_key(dataset_source(str(other), None, exclude=[tmp_path]), "train", "image", "label"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissingError, match="holds no files"):
        dataset_source(str(tmp_path / "empty"), None)
    arrow = next(data.rglob("*.arrow"))
    os.utime(arrow, ns=(arrow.stat().st_atime_ns, arrow.stat().st_mtime_ns + 10**9))  # the dataset was rewritten
    assert key != image_cache.cache_key(dataset_source(str(data), None), "train", "image", "label")


@pytest.mark.parametrize("threads", [1, 2])
def test_images_of_another_size_are_refused_and_nothing_is_kept(tmp_path, monkeypatch, threads):
    import metabolic.data.hf as hf

    monkeypatch.setattr(hf, "CHUNK_ROWS", 16)
    data = save_images(tmp_path / "dd", odd=40)  # in the third piece: the first two were written already
    with pytest.raises(ValueError, match=r"'data.image_key': the train split's images differ in shape "
                                         r"\(\(12, 12, 3\), \(14, 14, 3\)\)"):
        build_split(tmp_path / "cache", data, "train", threads=threads)
    assert os.listdir(tmp_path / "cache") == []


def test_a_stopped_decode_is_taken_up_where_it_stopped_and_a_damaged_file_is_refused(tmp_path, monkeypatch):
    import threading

    import metabolic.data.hf as hf

    monkeypatch.setattr(hf, "CHUNK_ROWS", 8)
    data = save_images(tmp_path / "dd")
    whole = tmp_path / "whole"
    key, expected = build_split(whole, data, "train")  # uninterrupted, for comparison
    folder = tmp_path / "cache"
    opened, looks = [], []

    def dataset():
        opened.append(1)
        return open_hf_split("train", str(data))

    def stop_at(piece: int):
        def should_stop() -> bool:  # looked at after each written piece; threads decode the next ones
            looks.append(1)
            return len(looks) == piece
        return should_stop

    with pytest.raises(file_cache.Interrupted, match="the 32 images decoded so far are kept"):
        image_cache.prepare(folder, key, dataset, "train", should_stop=stop_at(4), threads=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]  # the threads are gone
    assert sorted(os.listdir(folder)) == sorted(p.name for p in image_cache.part_paths(folder, key))  # no lock
    looks.clear()
    with pytest.raises(file_cache.Interrupted, match="the 56 images decoded so far are kept"):
        image_cache.prepare(folder, key, dataset, "train", should_stop=stop_at(3), threads=1)
    progress = image_cache.part_paths(folder, key)[2]
    assert json.loads(progress.read_text())["rows"] == 56  # the newest progress replaced the older record

    def second_ctrl_c() -> bool:  # not a stop: a failure in the middle of a resumed decode
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        image_cache.prepare(folder, key, dataset, "train", should_stop=second_ctrl_c)
    assert json.loads(progress.read_text())["rows"] == 64  # what was written before it is still kept
    image_cache.prepare(folder, key, dataset, "train")
    assert sorted(os.listdir(folder)) == sorted(f"{key}.{ext}" for ext in ("images", "labels", "json"))
    for ext in ("images", "labels"):
        assert (folder / f"{key}.{ext}").read_bytes() == (whole / f"{key}.{ext}").read_bytes()
    record = json.loads((folder / f"{key}.json").read_text())
    assert (record["mean"], record["std"], record["num_samples"]) == (list(expected["mean"]), list(expected["std"]), 90)
    image_cache.prepare(folder, key, dataset, "train")  # finished: the dataset is not even opened
    assert opened == [1, 1, 1, 1]
    # A decode killed without its progress record leaves files nobody vouches for: they are dropped.
    folder2 = tmp_path / "killed"
    folder2.mkdir()
    for p in image_cache.part_paths(folder2, key)[:2]:
        p.write_bytes(b"half an image")
    image_cache.prepare(folder2, key, dataset, "train")
    assert (folder2 / f"{key}.images").read_bytes() == (whole / f"{key}.images").read_bytes()
    assert not any(p.exists() for p in image_cache.part_paths(folder2, key))
    path = folder / f"{key}.images"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(DatasetMissingError, match=f"{path}.*delete the files {key}.\\* to build them again"):
        image_cache.open_split(folder, key)


def hf_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [str(CONFIG), f"output_dir={out}", "data.source=hf", f"data.path={data}", *SMALL, "data.limit=64",
            "data.eval_limit=30", "train.micro_batch_size=16", "train.max_steps=3", *extra]


def test_runs_decode_once_into_a_shared_cache_dir_and_resume_maps_the_run_folder(tmp_path):
    data = save_images(tmp_path / "dd")
    cache = tmp_path / "cache"
    first = ok(metabolic("train", *hf_args(tmp_path / "a", data, f"data.cache_dir={cache}")))
    assert first.stderr.count("decoding the") == 2  # train and test
    second = ok(metabolic("train", *hf_args(tmp_path / "b", data, f"data.cache_dir={cache}")))
    assert "decoding" not in second.stderr and not (tmp_path / "b" / "images").exists()
    assert summary(tmp_path / "a")["eval/loss"] == summary(tmp_path / "b")["eval/loss"]
    assert len(list(cache.glob("*.images"))) == 2
    # Without cache_dir the splits go in the run, where a resume finds them.
    ok(metabolic("train", *hf_args(tmp_path / "c", data)))
    assert sorted(p.name for p in (tmp_path / "c" / "images").iterdir()) == sorted(p.name for p in cache.iterdir())
    resumed = ok(metabolic("train", *hf_args(tmp_path / "c", data, "resume=true")))
    assert "resumed from step 3" in resumed.stderr and "decoding" not in resumed.stderr
    bad = metabolic("train", *hf_args(tmp_path / "d", data, "data.label_key=target"))
    assert bad.returncode == 2 and "config key 'data.label_key': column 'target' not in" in bad.stderr
    assert not (tmp_path / "d").exists()  # no empty run folder left behind


def test_two_ranks_train_on_what_rank_0_decoded(tmp_path):
    data = save_images(tmp_path / "dd")
    proc = ok(torchrun(2, "-m", "metabolic", "train", *hf_args(tmp_path / "run", data), timeout=300))
    assert proc.stderr.count("decoding the") == 2  # rank 0 alone, once per split
    assert summary(tmp_path / "run")["step"] == 3
    odd = save_images(tmp_path / "odd", odd=5)
    proc = torchrun(2, "-m", "metabolic", "train", *hf_args(tmp_path / "bad", odd), timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "rank 0 could not prepare the data: ConfigError: config key 'data.image_key'" in proc.stderr


def test_image_size_resizes_and_crops_every_image_in_the_first_images_colour_mode(tmp_path):
    import datasets
    import PIL.Image

    from metabolic.engine.config import ConfigError, load_config

    halves = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: already 8 on its shorter side
    halves[:, 8:] = 255
    images = [np.full((12, 12, 3), 90, np.uint8), halves, np.full((20, 10), 200, np.uint8),  # grayscale
              np.full((8, 8, 4), 30, np.uint8)]  # RGBA
    ds = datasets.Dataset.from_dict({"image": [PIL.Image.fromarray(a) for a in images], "label": [0, 1, 2, 3]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="differ in shape.*set data.image_size"):
        load_hf_split("train", path=str(tmp_path / "dd"))
    folder = tmp_path / "cache"
    source = dataset_source(str(tmp_path / "dd"), None)
    key = image_cache.cache_key(source, "train", "image", "label", 8)
    assert key != image_cache.cache_key(source, "train", "image", "label", 9)
    record = image_cache.build(folder, key, open_hf_split("train", str(tmp_path / "dd")), "train", size=8)
    cached, _ = image_cache.open_split(folder, key)
    assert cached.images.shape == (4, 3, 8, 8) and record["image_size"] == 8 and cached.num_classes == 4
    assert torch.equal(cached.images, load_hf_split("train", path=str(tmp_path / "dd"), size=8).images)
    assert bool((cached.images[0] == 90).all()) and bool((cached.images[2] == 200).all())  # gray -> 3 equal channels
    assert bool((cached.images[1, :, :, :4] == 0).all()) and bool((cached.images[1, :, :, 4:] == 255).all())
    assert bool((cached.images[3] == 30).all())  # alpha dropped
    for bad in ("data.image_size=0", "data.source=idx"):
        with pytest.raises(ConfigError, match="config key 'data.image_size'"):
            load_config(CONFIG, ["data.source=hf", "data.image_size=8", bad])


def test_without_file_locks_runs_build_without_taking_turns_and_leave_no_lock(tmp_path, monkeypatch):
    # NFS mounted nolock, Lustre without flock: lockf fails with ENOLCK (simulated here).
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(file_cache.fcntl, "lockf", no_locks)
    data = save_images(tmp_path / "dd")
    folder = tmp_path / "cache"
    key = image_cache.cache_key(dataset_source(str(data), None), "train", "image", "label")
    with pytest.raises(KeyError) as failed:  # a build's own error is not reported as caused by the locks
        image_cache.prepare(folder, key, lambda: {}["no dataset"], "train")
    assert failed.value.__context__ is None and os.listdir(folder) == []
    image_cache.prepare(folder, key, lambda: open_hf_split("train", str(data)), "train")
    assert image_cache.is_built(folder, key) and not file_cache.lock_path(folder, key).exists()


def test_a_disk_without_room_for_the_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import collections

    data = save_images(tmp_path / "dd")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DatasetMissingError, match=r"needs about 0.0 GiB, .* free: free space, or set data.cache_dir"):
        build_split(tmp_path / "cache", data, "train")
    assert os.listdir(tmp_path / "cache") == []


def test_cmyk_and_palette_images_are_read_in_the_splits_colour_mode(tmp_path):
    # ImageNet holds a few CMYK JPEGs and palette PNGs among its RGB images.
    import io

    import datasets
    import PIL.Image

    def encoded(image, fmt):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return {"bytes": buf.getvalue(), "path": None}

    red = PIL.Image.new("RGB", (6, 6), (255, 0, 0))
    palette = PIL.Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 0, 200, 40] + [0] * 762)
    items = [encoded(red, "PNG"), encoded(red.convert("CMYK"), "JPEG"), encoded(palette, "PNG"),
             encoded(PIL.Image.new("LA", (6, 6), (90, 255)), "PNG")]
    ds = datasets.Dataset.from_dict({"image": items, "label": [0, 1, 2, 3]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    images = load_hf_split("train", path=str(tmp_path / "dd")).images
    assert images.shape == (4, 3, 6, 6)
    assert images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert (images[1, :, 0, 0].int() - torch.tensor([255, 0, 0])).abs().max() <= 8  # JPEG is lossy
    assert images[2, :, 0, 0].tolist() == [0, 200, 40] and images[3, :, 0, 0].tolist() == [90, 90, 90]


def test_a_cache_dir_that_cannot_be_written_names_its_key(tmp_path, monkeypatch):
    # Root may write anywhere here, so the refusal of a read-only mount is simulated at open().
    import errno

    data = save_images(tmp_path / "dd")
    cache = tmp_path / "cache"
    cache.mkdir()
    real_open = os.open

    def read_only(path, *args, **kw):
        if str(path).startswith(str(cache)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(file_cache.os, "open", read_only)
    from types import SimpleNamespace

    cfg = SimpleNamespace(path=str(data), hf_name=None, image_key="image", label_key="label", image_size=None,
                          decode_threads=1, cache_dir=str(cache))
    with pytest.raises(ValueError, match=f"config key 'data.cache_dir': cannot write in '{cache}'.*Read-only"):
        image_cache.prepare_splits(cfg, tmp_path / "run")
    assert os.listdir(cache) == [] and not (tmp_path / "run").exists()
    # A cache_dir above data.path: a file of the dataset that cannot be read is not the cache's fault.
    monkeypatch.setattr(file_cache.os, "open", real_open)
    import datasets

    def unreadable(*args, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(data / "train" / "data-00000-of-00001.arrow"))

    monkeypatch.setattr(datasets, "load_from_disk", unreadable)
    above = SimpleNamespace(**{**vars(cfg), "cache_dir": str(tmp_path)})
    with pytest.raises(PermissionError):
        image_cache.prepare_splits(above, tmp_path / "run")


def test_a_stop_signal_while_decoding_exits_for_a_resume(tmp_path):
    # SLURM's preemption notice during a long decode: exit 75, keeping the pieces decoded so far;
    # the run started again goes on from them and trains.
    data = save_images(tmp_path / "dd", sizes=(("train", 2000), ("test", 30)), side=96)
    out = tmp_path / "run"
    args = hf_args(out, data)
    code, err = stop_when_logged(args, "decoding the train split")
    assert code == 75, err[-3000:]
    assert "stopped while decoding the train split" in err and "resume=true" in err
    again = ok(metabolic("train", *args, "resume=true"))
    assert "decoded the train split" in again.stderr and summary(out)["step"] == 3
    assert "decoded so far are kept" in err and "where a stopped decode left off" in again.stderr
