"""Dataset sources: IDX parsing against known labels, HF datasets from local files, clear errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from metabolic.data import DatasetMissingError, load_hf_split, load_idx_split, read_idx
from metabolic.data.arrays import ImageArrays, random_crop_flip


def write_idx(path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(">u1" if code == 0x08 else ">i4").tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def test_fashion_mnist_known_labels(fmnist):
    train, test = load_idx_split(fmnist, "train"), load_idx_split(fmnist, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.sample_shape == (1, 28, 28) and train.num_classes == 10
    # The published first labels: ankle boot, T-shirt, T-shirt, dress, T-shirt, pullover, ...
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_idx_roundtrip_plain_and_gz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, size=7).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2])
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    split = load_idx_split(tmp_path, "train")
    assert split.images.shape == (7, 1, 5, 4) and split.num_classes == int(labels.max()) + 1
    assert split.labels.tolist() == labels.tolist()
    wide = np.arange(6, dtype=np.int64).reshape(2, 3) * 70000
    write_idx(tmp_path / "wide-idx2-int", wide, code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "wide-idx2-int"), wide)


def test_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetMissingError, match="dataset-fashion-mnist"):
        load_idx_split(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissingError, match="train-images-idx3-ubyte"):
        load_idx_split(tmp_path / "empty", "train")


def _tiny_hf(tmp_path):
    import datasets  # a declared dependency: missing is a failure, not a skip

    rng = np.random.default_rng(1)
    splits = {}
    for split, n in (("train", 12), ("test", 5)):
        splits[split] = datasets.Dataset.from_dict({
            "image": [rng.integers(0, 256, size=(6, 6), dtype=np.uint8) for _ in range(n)],
            "label": rng.integers(0, 4, size=n).tolist()})
    return datasets, splits


def test_hf_source_save_to_disk(tmp_path):
    datasets, splits = _tiny_hf(tmp_path)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    train = load_hf_split("train", path=str(tmp_path / "dd"))
    assert train.images.shape == (12, 1, 6, 6) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == splits["train"]["label"]
    np.testing.assert_array_equal(train.images[3, 0].numpy(), np.asarray(splits["train"][3]["image"]))


def test_hf_source_parquet_files(tmp_path):
    datasets, splits = _tiny_hf(tmp_path)
    (tmp_path / "pq").mkdir()
    for name, ds in splits.items():
        ds.to_parquet(str(tmp_path / "pq" / f"{name}.parquet"))
    test = load_hf_split("test", path=str(tmp_path / "pq"))
    assert len(test) == 5 and test.labels.tolist() == splits["test"]["label"]
    with pytest.raises(ValueError, match="data.label_key"):
        load_hf_split("test", path=str(tmp_path / "pq"), label_key="target")


def test_classes_come_from_both_splits_and_bad_labels_name_the_key(tmp_path):
    # A class only the test split holds must fit the model's head (sized from the splits' count).
    from types import SimpleNamespace
    from metabolic.data import load_image_splits

    train_labels, test_labels = np.array([0, 1, 1, 0], np.uint8), np.array([2, 0], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels)
    cfg = SimpleNamespace(source="idx", path=str(tmp_path), hf_name=None, limit=None, eval_limit=None)
    train, test = load_image_splits(cfg)
    assert train.num_classes == test.num_classes == 3
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, -1], np.int32), code=0x0C)
    with pytest.raises(ValueError, match="'data.path': the test split has negative labels"):
        load_image_splits(cfg)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"'data.path': test images are \(1, 4, 4\).*training images \(1, 3, 3\)"):
        load_image_splits(cfg)
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # header cut after 6 bytes
    with pytest.raises(ValueError, match="short is truncated: its header needs 16 bytes"):
        read_idx(tmp_path / "short")


def test_hf_images_of_different_sizes_name_the_key(tmp_path):
    datasets, _ = _tiny_hf(tmp_path)
    mixed = datasets.Dataset.from_dict({"image": [np.zeros((6, 6), np.uint8), np.zeros((5, 7), np.uint8)],
                                        "label": [0, 1]})
    datasets.DatasetDict({"train": mixed}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"'data.image_key': the train split's images differ in shape \(\(5, 7\), \(6, 6\)\)"):
        load_hf_split("train", path=str(tmp_path / "dd"))


def test_hf_dataset_dict_without_the_split_names_the_splits_it_has(tmp_path):
    datasets, splits = _tiny_hf(tmp_path)
    datasets.DatasetDict({"train": splits["train"]}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetMissingError, match=r"holds the splits \['train'\], no 'test'"):
        load_hf_split("test", path=str(tmp_path / "dd"))


def test_hub_name_with_a_local_folder_that_holds_no_split_says_how_to_reach_the_hub(tmp_path):
    # data.path defaults to the IDX folder: a hub name alone would read (and fail on) that folder
    with pytest.raises(DatasetMissingError, match=r"holds no train split.*data.hf_name 'org/name'.*data.path=null"):
        load_hf_split("train", path=str(tmp_path), hub_name="org/name")


def test_rgba_drops_alpha_and_each_channel_is_normalised_with_the_whole_train_split(tmp_path):
    from types import SimpleNamespace
    from metabolic.data import load_image_splits

    datasets, _ = _tiny_hf(tmp_path)
    rng = np.random.default_rng(2)

    def rgba():  # channels around three different levels; alpha is opaque and carries nothing
        rgb = np.stack([rng.integers(low, low + 60, size=(5, 5)) for low in (0, 90, 180)], axis=-1)
        return np.concatenate([rgb, np.full((5, 5, 1), 255)], axis=-1).astype(np.uint8)

    splits = {name: datasets.Dataset.from_dict({"image": [rgba() for _ in range(n)], "label": [0, 1] * (n // 2)})
              for name, n in (("train", 12), ("test", 4))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    cfg = SimpleNamespace(source="hf", path=str(tmp_path / "dd"), hf_name=None, image_key="image",
                          label_key="label", image_size=None, limit=None, eval_limit=None)
    train, test = load_image_splits(cfg)
    assert train.images.shape == (12, 3, 5, 5) and test.images.shape == (4, 3, 5, 5)
    pixels = np.stack([np.asarray(im) for im in splits["train"]["image"]])[..., :3] / 255.0
    assert train.mean == test.mean == pytest.approx(pixels.mean(axis=(0, 1, 2)), abs=1e-4)
    assert train.std == test.std == pytest.approx(pixels.std(axis=(0, 1, 2)), abs=1e-4)
    x, _ = train.batch(torch.arange(12))
    assert x.mean(dim=(0, 2, 3)) == pytest.approx([0.0] * 3, abs=1e-3)
    assert x.std(dim=(0, 2, 3), unbiased=False) == pytest.approx([1.0] * 3, abs=1e-3)
    # data.limit trains on fewer samples but normalises them the same way
    limited, _ = load_image_splits(SimpleNamespace(**{**vars(cfg), "limit": 4}))
    assert len(limited) == 4 and (limited.mean, limited.std) == (train.mean, train.std)


def test_batch_keeps_indices_and_augments_reproducibly():
    images = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).reshape(4, 1, 6, 6).to(torch.uint8)
    arrays = ImageArrays(images, torch.tensor([0, 1, 2, 3]), num_classes=4, mean=(0.0,), std=(1.0,))
    x, y = arrays.batch(torch.tensor([3, 1]))
    assert y.tolist() == [3, 1] and torch.allclose(x[0], images[3].float() / 255, rtol=1e-6, atol=0)
    a = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # crops only ever move pixels, never invent values
    assert set(a.unique().tolist()) <= set(x.unique().tolist()) | {0.0}
    # pad 0: each image is itself or its mirror image
    same = random_crop_flip(x, 0, torch.Generator().manual_seed(3))
    for out, img in zip(same, x):
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))


def test_crop_flip_equals_a_per_sample_reference():
    # The clear version: draw the same shifts and flips, then crop and mirror one sample at a time.
    def reference(x, pad, generator):
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        out = [padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]
        return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip.tolist())])

    x = torch.rand(64, 3, 9, 7)
    for pad in (0, 1, 2, 4):
        got = random_crop_flip(x, pad, torch.Generator().manual_seed(pad))
        assert torch.equal(got, reference(x, pad, torch.Generator().manual_seed(pad)))


@pytest.mark.gpu
def test_image_batches_on_cuda_equal_the_cpu_ones():
    # Only uint8 pixels travel; crop, flip and normalisation run on the device from the CPU generator.
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    arrays = ImageArrays(images, torch.arange(40), num_classes=40, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    idx = torch.randperm(40)[:24]
    for augment in (False, True):
        x_cpu, y_cpu = arrays.batch(idx, augment, torch.Generator().manual_seed(1))
        x_gpu, y_gpu = arrays.batch(idx, augment, torch.Generator().manual_seed(1), device=torch.device("cuda"))
        assert x_gpu.device.type == "cuda" and torch.equal(y_gpu, y_cpu)
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-6, atol=1e-6)
