import numpy as np
import pytest
import torch

from ssmooth.data import DATASETS, IndexedDataset, SmoothingDataModule, crop_flip_augmentation, load_split



def test_digits_loads_in_unit_range_with_a_fixed_split():
    train = load_split("digits", "train")
    test = load_split("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) == 1.0
    # train and test partition the 1797 bundled images
    both = torch.cat([train.indices, test.indices])
    assert torch.equal(both.sort().values, torch.arange(1797))
    # stratified: every class has 35-37 test images
    assert set(torch.bincount(test.labels).tolist()) <= {35, 36, 37}

    again = load_split("digits", "test")
    assert torch.equal(again.indices, test.indices) and torch.equal(again.images, test.images)
    # pins the split itself: if scikit-learn ever changes it, the test set would silently change
    assert test.indices[:5].tolist() == [21, 24, 28, 34, 35] and int(test.indices.sum()) == 337944


def test_digits_stats_match_the_stated_constants():
    images = load_split("digits", "train").images
    info = DATASETS["digits"]
    assert float(images.mean()) == pytest.approx(info.mean[0], abs=1e-4)
    assert float(images.std(unbiased=False)) == pytest.approx(info.std[0], abs=1e-4)


def test_items_are_image_label_index():
    test = load_split("digits", "test")
    x, y, index = test[3]
    assert x.shape == (1, 8, 8)
    assert int(y) == int(test.labels[3]) and int(index) == int(test.indices[3])

    plain = IndexedDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 3]))
    assert [int(plain[i][2]) for i in range(4)] == [0, 1, 2, 3]
    part = plain.subset([3, 1])
    assert part.indices.tolist() == [3, 1] and part.labels.tolist() == [3, 1]


def _write_mnist_npz(path, n=6, with_index=True):
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        "labels": np.arange(n, dtype=np.int64) % 10,
    }
    if with_index:
        arrays["index"] = np.arange(100, 100 + n, dtype=np.int64)
    np.savez_compressed(path, **arrays)
    return arrays


def test_npz_round_trip_uses_the_index(tmp_path):
    arrays = _write_mnist_npz(tmp_path / "m.npz")
    data = load_split("mnist", "test", source="npz", npz_path=tmp_path / "m.npz")
    assert data.images.shape == (6, 1, 28, 28)
    torch.testing.assert_close(data.images[:, 0], torch.from_numpy(arrays["images"]).float() / 255)
    assert data.labels.tolist() == arrays["labels"].tolist()
    assert data.indices.tolist() == list(range(100, 106))
    assert int(data[2][2]) == 102

    _write_mnist_npz(tmp_path / "plain.npz", with_index=False)
    assert load_split("mnist", "test", source="npz", npz_path=tmp_path / "plain.npz").indices.tolist() == list(range(6))


def test_npz_cifar_layout_and_default_file_names(tmp_path):
    (tmp_path / "cifar10").mkdir()
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[1, :, :, 2] = 255  # blue channel of the second image
    np.savez(tmp_path / "cifar10" / "cifar10_test_first1000.npz", images=images, labels=np.array([0, 9]))
    data = load_split("cifar10", "test", source="npz", npz_dir=tmp_path)
    assert data.images.shape == (2, 3, 32, 32)
    assert float(data.images[1, 2].min()) == 1.0 and float(data.images[1, :2].max()) == 0.0


def test_missing_npz_names_the_path_and_both_ways(tmp_path):
    missing = tmp_path / "nowhere" / "mnist_test.npz"
    with pytest.raises(FileNotFoundError) as error:
        load_split("mnist", "test", source="npz", npz_path=missing)
    message = str(error.value)
    assert str(missing) in message and "download" in message and "npz" in message


def test_missing_torchvision_files_say_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_split("mnist", "test", source="torchvision", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "dataset.download=true" in message and "dataset.source=npz" in message


def test_bad_npz_contents_name_the_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 28, 28), dtype=np.int16), labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="bad.npz.*uint8"):
        load_split("mnist", "train", source="npz", npz_path=path)
    np.savez(path, images=np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="bad.npz.*labels"):
        load_split("mnist", "train", source="npz", npz_path=path)
    path.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="bad.npz"):
        load_split("mnist", "train", source="npz", npz_path=path)


def test_float_npz_images_load_as_given_and_bad_pixels_are_refused(tmp_path):
    path = tmp_path / "float.npz"
    images = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    np.savez(path, images=images, labels=np.array([1, 2, 3]))
    data = load_split("mnist", "test", source="npz", npz_path=path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))  # already in [0,1]: not divided by 255

    images[1, 3, 4] = np.nan
    images[2, 0, 0] = np.inf
    np.savez(path, images=images, labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"float.npz: 2 pixel values are NaN or infinite \(in 2 images, the first at position 1\)"):
        load_split("mnist", "test", source="npz", npz_path=path)
    images[1, 3, 4], images[2, 0, 0] = 0.5, 1.5
    np.savez(path, images=images, labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"float.npz: pixel values must lie in \[0, 1\], got .*\.\.1\.5"):
        load_split("mnist", "test", source="npz", npz_path=path)


def test_npz_source_without_a_folder_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"dataset.source=npz needs dataset.npz_dir=DIR.*mnist/mnist_train.npz"):
        SmoothingDataModule("mnist", source="npz")


def test_an_empty_or_inverted_test_subset_is_refused_naming_the_keys():
    dm = SmoothingDataModule("digits")
    with pytest.raises(ValueError, match=r"certify.start=360 is past the end of the digits test split \(360 images"):
        dm.test_points(start=360)
    with pytest.raises(ValueError, match=r"certify.max=100 is not above certify.start=200"):
        dm.test_points(start=200, max=100)
    with pytest.raises(ValueError, match=r"certify.max=5 is not above certify.start=5"):
        dm.test_points(start=5, max=5)
    assert len(dm.test_points(start=359)) == 1  # the last position is still a subset


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10.*digits.*mnist"):
        load_split("svhn", "test")
    with pytest.raises(ValueError, match="unknown dataset source 'ftp'"):
        load_split("mnist", "test", source="ftp")
    with pytest.raises(ValueError, match="digits.*cannot be loaded from source 'torchvision'"):
        SmoothingDataModule("digits", source="torchvision")
    with pytest.raises(ValueError, match="unknown split"):
        load_split("digits", "val")


def test_shared_mnist_test_file(shared_data):
    data = load_split("mnist", "test", source="npz", npz_dir=shared_data)
    assert data.images.shape == (10000, 1, 28, 28)
    counts = torch.bincount(data.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # PROVENANCE.md
    assert float(data.images.mean()) == pytest.approx(0.13251, abs=1e-4)


def test_test_points_follow_skip_and_max():
    dm = SmoothingDataModule("digits")
    points = dm.test_points(skip=20, max=100)  # max bounds the position, as in Cohen's certify.py
    assert len(points) == 5
    assert points.indices.tolist() == dm.test_set.indices[[0, 20, 40, 60, 80]].tolist()
    assert len(dm.test_points(skip=20, max=-1)) == 18  # ceil(360 / 20)
    assert len(dm.test_points(skip=1, max=None)) == 360
    assert dm.test_points(skip=10, max=25, start=5).indices.tolist() == dm.test_set.indices[[5, 15]].tolist()


def test_datamodule_loaders_yield_indexed_batches():
    dm = SmoothingDataModule("digits", batch_size=32, eval_batch_size=100, train_subset=64, val_subset=150)
    dm.setup("fit")
    assert dm.num_train == 64 and dm.info.input_shape == (1, 8, 8)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == index.shape == (32,)
    assert set(index.tolist()) <= set(dm.train_set.indices.tolist())
    assert sum(len(batch[0]) for batch in dm.val_dataloader()) == 150

    # the same seed shuffles the same way
    order = [b[2] for b in SmoothingDataModule("digits", batch_size=32, seed=3).train_dataloader()]
    again = [b[2] for b in SmoothingDataModule("digits", batch_size=32, seed=3).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(order, again))


def test_crop_flip_keeps_shape_and_only_moves_pixels():
    torch.manual_seed(0)
    augment = crop_flip_augmentation((32, 32))
    x = torch.rand(3, 32, 32)
    out = [augment(x) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in out)
    assert any(not torch.equal(o, x) for o in out)
    assert all(float(o.max()) <= float(x.max()) for o in out)  # zero padding, no interpolation

    train = IndexedDataset(x.unsqueeze(0), torch.tensor([1]), transform=augment)
    assert train[0][0].shape == (3, 32, 32)
