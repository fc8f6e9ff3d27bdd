"""Data: IDX reader, Fashion-MNIST, repeated-augmentation sampler, image folders, batch augs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.train.augment import random_crop_flip, random_erasing
from deit.train.data import (
    BadSample,
    DeviceBatches,
    ImageFolder,
    RepeatAugSampler,
    collate_skip_bad,
    repeated_indices,
)
from deit.train.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist, read_idx

from .conftest import idx_bytes

HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


def test_read_idx_raw_and_gzip(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(idx_bytes(arr, gz=True))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 4)))[:-3])
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "short")


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_from_any_folder(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.arange(5), gz=True))
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.bincount().tolist() == [1000] * 10


def test_repeated_indices_single_and_distributed() -> None:
    one = repeated_indices(12, 3, epoch=1, seed=5)
    assert len(one) == 12
    assert all(len(set(one[i : i + 3].tolist())) == 1 for i in range(0, 12, 3))  # 3 copies in a row
    ranks = [repeated_indices(12, 3, epoch=1, seed=5, rank=r, world=2) for r in range(2)]
    assert all(len(r) == 6 for r in ranks)
    assert sorted(torch.cat(ranks).tolist()) == sorted(one.tolist())  # same samples, dealt out
    assert ranks[0][0] == ranks[1][0]  # copies of one image go to different ranks
    assert not torch.equal(one, repeated_indices(12, 3, epoch=2, seed=5))
    assert sorted(repeated_indices(10, 1).tolist()) == list(range(10))


def test_sampler_reshuffles_per_epoch() -> None:
    sampler = RepeatAugSampler(30, repeats=3, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert len(first) == len(sampler) == 30 and first != list(sampler)


def _png(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_image_folder_sorted_classes_and_bad_files(tmp_path: Path) -> None:
    for cls in ("zebra", "apple"):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.png", 10)
    (tmp_path / "zebra" / "broken.png").write_bytes(b"not an image")
    ds = ImageFolder(tmp_path, transform=lambda im: torch.from_numpy(np.array(im)).float())
    assert ds.classes == ["apple", "zebra"]
    items = [ds[i] for i in range(len(ds))]
    bad = [i for i in items if isinstance(i, BadSample)]
    assert len(bad) == 1 and bad[0].path.endswith("broken.png")
    x, y, skipped = collate_skip_bad(items)
    assert x.shape[0] == 2 and y.tolist() == [0, 1] and skipped == bad
    x, y, skipped = collate_skip_bad(bad)
    assert len(x) == 0 and len(skipped) == 1


def test_image_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "shirt").mkdir()
    (tmp_path / "shirt" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no image files .* named shirt"):
        ImageFolder(tmp_path)


def test_class_folders_match_labels_loosely_or_by_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deit.train.data import match_class_folders

    labels = ["T-shirt/top", "Trouser", "Ankle boot"]
    for name in ("ankle-boot", "t-shirt-top"):
        (tmp_path / "named" / name).mkdir(parents=True)
    classes = match_class_folders(tmp_path / "named", labels)
    assert classes[0] == "t-shirt-top" and classes[2] == "ankle-boot" and classes[1] == "/1"
    for name in ("a", "b", "c"):
        (tmp_path / "ordered" / name).mkdir(parents=True)
    assert match_class_folders(tmp_path / "ordered", labels) == ["a", "b", "c"]
    assert "sorted order" in caplog.text
    with pytest.raises(ValueError, match="3 class folders, 3 of them not named"):
        match_class_folders(tmp_path / "ordered", labels[:2] + labels + labels)
    (tmp_path / "twice" / "Trouser").mkdir(parents=True)
    (tmp_path / "twice" / "trouser").mkdir(parents=True)
    with pytest.raises(ValueError, match="both match"):
        match_class_folders(tmp_path / "twice", labels)
    # "/" separates alternatives, as when fine-tuning: `t-shirt` is "T-shirt/top"
    for name in ("t-shirt", "trousers", "Ankle_Boot"):
        (tmp_path / "short" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="1 of them not named"):  # no partial words
        match_class_folders(tmp_path / "short", [*labels, "Bag"])
    (tmp_path / "short" / "trousers").rename(tmp_path / "short" / "TROUSER")
    assert match_class_folders(tmp_path / "short", labels) == ["t-shirt", "TROUSER", "Ankle_Boot"]
    (tmp_path / "alt" / "top").mkdir(parents=True)
    (tmp_path / "alt" / "t-shirt").mkdir(parents=True)
    with pytest.raises(ValueError, match="folders 't-shirt' and 'top' both match the label"):
        match_class_folders(tmp_path / "alt", labels)


def test_imagefolder_recipe_needs_a_path() -> None:
    from deit.train.data import build_data
    from deit.train.runconfig import load_config

    cfg = load_config(None, ["data.dataset=imagefolder"])
    with pytest.raises(ValueError, match=r"needs data\.path"):
        build_data(cfg, torch.device("cpu"), 0, 1)


def test_batch_augmentations() -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(random_crop_flip(x, 0, 1.0), x.flip(-1))
    cropped = random_crop_flip(x, 2, 0.0)
    assert cropped.shape == x.shape
    assert random_erasing(x, 0.0) is x
    erased = random_erasing(x.clone(), 1.0)
    assert erased.shape == x.shape and not torch.equal(erased, x)


def test_device_batches() -> None:
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    train = DeviceBatches(
        images, labels, 16, [0.5], [0.25], train=True, crop_padding=1, hflip=0.5, erasing=0.25
    )
    batches = list(train)
    assert len(train) == len(batches) == 3 and all(len(y) == 16 for _, y in batches)
    val = DeviceBatches(images, labels, 16, [0.5], [0.25], img_size=16, channels=3)
    batches = list(val)
    assert len(batches) == 4 and batches[0][0].shape == (16, 3, 16, 16)
    assert torch.cat([y for _, y in batches]).tolist() == labels.tolist()
