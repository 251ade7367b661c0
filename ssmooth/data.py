"""Datasets and the Lightning DataModule. Every item is ``(x, y, index)`` with x a float image in [0,1].

``index`` is the item's canonical position in the original dataset (e.g. CIFAR-10 test image 123), so that
per-sample state (a sample-wise sigma table, certification rows) can be keyed by it on any rank, under any
subset or shuffling.

Sources:
  * ``sklearn`` (digits only): scikit-learn's bundled 8x8 digits, no download; a fixed stratified split.
  * ``torchvision`` (mnist, cifar10): files under ``root``; ``download=True`` lets torchvision fetch them.
  * ``npz`` (mnist, cifar10): ``images`` uint8 (MNIST NHW, CIFAR NHWC) or float in [0,1], ``labels`` int64,
    optional ``index``; ``NPZ_FILES`` gives the file names under ``npz_dir``.
  * ``imagefolder`` (imagenet): ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``, torchvision's
    ImageFolder layout (torchvision's ``ImageNet`` class, which unpacks the devkit tarballs, is not used).

Every split held in memory is checked: a NaN or infinite pixel, or one outside [0,1], is refused with the file
named.

MNIST, CIFAR-10 and digits splits are held in memory as one float32 tensor (CIFAR-10 train: 50000 x 3072 floats,
about 600 MB). ImageNet is decoded from its files on each access (``ImageFileDataset``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "test")
SOURCES = ("auto", "sklearn", "torchvision", "npz", "imagefolder")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset.

    ``mean``/``std`` are per-channel training-set statistics for the model's Normalize layer. Whether a model
    uses them is the model config's choice: the MNIST LeNet of the reference papers uses none (docs/METHOD.md).
    ``sources``: the supported sources, the first one being what ``source="auto"`` picks.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sources: tuple[str, ...]
    default_radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


DATASETS: dict[str, DatasetInfo] = {
    # mean/std: all pixels of the 1437 training images of the fixed split below, scaled to [0,1]
    "digits": DatasetInfo("digits", (1, 8, 8), 10, (0.3054,), (0.3761,), ("sklearn",)),
    # MNIST papers report radii up to 2.0 (their ACRs reach 1.6)
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), ("torchvision", "npz"),
        default_radii=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
    ),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), ("torchvision", "npz")
    ),
    # Cohen et al.'s protocol: 224x224 crops, ImageNet statistics as the model's first layer, radii 0 to 3
    "imagenet": DatasetInfo(
        "imagenet", (3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ("imagefolder",),
        default_radii=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
    ),
}

# ImageFolder split folders under ``root`` (the test split is ImageNet's validation set, as in Cohen et al.)
IMAGEFOLDER_SPLITS = {"train": "train", "test": "val"}
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224

# Default file names under ``npz_dir`` (the CIFAR-10 files hold canonical items 0..k-1).
NPZ_FILES: dict[tuple[str, str], str] = {
    ("mnist", "train"): "mnist/mnist_train.npz",
    ("mnist", "test"): "mnist/mnist_test.npz",
    ("cifar10", "train"): "cifar10/cifar10_train_first4000.npz",
    ("cifar10", "test"): "cifar10/cifar10_test_first1000.npz",
}

DIGITS_TEST_SIZE = 360  # of 1797; stratified, random_state 0: identical on every machine


class IndexedDataset(Dataset):
    """Images ``[N, C, H, W]`` in [0,1], labels ``[N]`` and dataset indices ``[N]``; item i is ``(x, y, index)``.

    ``transform`` (train-time augmentation) is applied to x on every access.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if indices is None:
            indices = torch.arange(len(images))
        if not (len(images) == len(labels) == len(indices)):
            raise ValueError(f"images, labels, indices differ in length: {len(images)}, {len(labels)}, {len(indices)}")
        self.images = images
        self.labels = labels.long()
        self.indices = indices.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.images[position]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[position], self.indices[position]

    def subset(self, positions: Sequence[int] | torch.Tensor | slice) -> IndexedDataset:
        """The items at ``positions`` (positions in this dataset, not dataset indices), same transform."""
        if not isinstance(positions, slice):
            positions = torch.as_tensor(positions, dtype=torch.long)
        return IndexedDataset(self.images[positions], self.labels[positions], self.indices[positions], self.transform)


def crop_flip_augmentation(size: tuple[int, int], padding: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop of ``size`` after zero-padding by ``padding``, and random horizontal flip (the CIFAR recipe)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])


def resolve_source(name: str, source: str) -> str:
    info = dataset_info(name)
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; known sources: {list(SOURCES)}")
    if source == "auto":
        return info.sources[0]
    if source not in info.sources:
        raise ValueError(f"dataset {name!r} cannot be loaded from source {source!r}; it supports {list(info.sources)}")
    return source


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    return DATASETS[name]


def load_split(
    name: str,
    split: str,
    source: str = "auto",
    root: str | Path = "data",
    download: bool = False,
    npz_path: str | Path | None = None,
    npz_dir: str | Path | None = None,
    augment: bool = False,
) -> IndexedDataset:
    """Load one split (``"train"`` or ``"test"``) of dataset ``name``: into memory, or for ``imagefolder`` as a
    list of files decoded on access.

    ``npz_path`` names the file explicitly; otherwise it is ``npz_dir / NPZ_FILES[name, split]``. ``augment``
    turns on the train-time augmentation of datasets that have one (CIFAR-10, ImageNet), on the train split only.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    source = resolve_source(name, source)
    if source == "imagefolder":
        return load_imagefolder(info, split, Path(root), augment=augment and split == "train")
    if source == "sklearn":
        images, labels, indices = _load_digits(split)
    elif source == "torchvision":
        images, labels, indices = _load_torchvision(name, split, Path(root), download)
    else:
        if npz_path is None:
            if npz_dir is None:
                raise ValueError(f"dataset.source=npz needs dataset.npz_dir=DIR, the folder holding "
                                 f"{NPZ_FILES[name, 'train']} and {NPZ_FILES[name, 'test']}")
            npz_path = Path(npz_dir) / NPZ_FILES[name, split]
        images, labels, indices = _load_npz(info, Path(npz_path), root)
    transform = None
    if augment and split == "train" and name == "cifar10":
        transform = crop_flip_augmentation(info.input_shape[1:])
    return IndexedDataset(images, labels, indices, transform)


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    positions = np.arange(len(digits.target))
    train, test = train_test_split(positions, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0)
    chosen = np.sort(train if split == "train" else test)  # canonical order, so skip/max subsets are stable
    images = torch.from_numpy(digits.images[chosen] / 16.0).float().unsqueeze(1)  # pixel values are 0..16
    return images, torch.from_numpy(digits.target[chosen]).long(), torch.from_numpy(chosen).long()


def _how_to_get(name: str, root: str | Path) -> str:
    return (
        f"Get the data one of two ways: set dataset.download=true to let torchvision download {name} into "
        f"dataset.root ({root}), or set dataset.source=npz dataset.npz_dir=DIR where DIR holds "
        f"{NPZ_FILES[name, 'train']} and {NPZ_FILES[name, 'test']}."
    )


def _load_torchvision(
    name: str, split: str, root: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torchvision

    dataset_class = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        dataset = dataset_class(str(root), train=split == "train", download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found ... use download=True"
        if download:
            raise
        message = f"{name} {split} files not found under {root.resolve()}. {_how_to_get(name, root)}"
        raise FileNotFoundError(message) from error
    images = torch.as_tensor(np.asarray(dataset.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
    return _to_unit_float(images), labels, torch.arange(len(labels))


def _load_npz(info: DatasetInfo, path: Path, root: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{info.name} npz file not found: {path}. {_how_to_get(info.name, root)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path} as an .npz archive without pickles: {error}") from error

    for key in ("images", "labels"):
        if key not in arrays:
            raise ValueError(f"{path} has no {key!r} array (found {sorted(arrays)})")
    images, labels = arrays["images"], arrays["labels"]
    channels, height, width = info.input_shape
    expected = (height, width) if channels == 1 else (height, width, channels)  # MNIST NHW, CIFAR NHWC
    unit_float = np.issubdtype(images.dtype, np.floating)
    if not (images.dtype == np.uint8 or unit_float) or images.ndim != 1 + len(expected) or images.shape[1:] != expected:
        raise ValueError(
            f"{path}: 'images' must be uint8 (0-255) or float (0-1) of shape (N, {', '.join(map(str, expected))}), "
            f"got {images.dtype} {images.shape}"
        )
    n = len(images)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise ValueError(f"{path}: 'labels' must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise ValueError(f"{path}: labels must lie in 0..{info.num_classes - 1}, got {labels.min()}..{labels.max()}")
    if "index" in arrays:
        indices = arrays["index"]
        if not np.issubdtype(indices.dtype, np.integer) or indices.shape != (n,):
            raise ValueError(f"{path}: 'index' must be integers of shape ({n},), got {indices.dtype} {indices.shape}")
        if len(np.unique(indices)) != n:
            raise ValueError(f"{path}: 'index' has repeated values; it must name each item once")
    else:
        indices = np.arange(n)

    images_t = torch.from_numpy(images)
    images_t = images_t.unsqueeze(1) if channels == 1 else images_t.permute(0, 3, 1, 2)
    labels_t, indices_t = torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(indices.astype(np.int64))
    if unit_float:
        images_t = images_t.float().contiguous()
        check_pixels(images_t, str(path))
        return images_t, labels_t, indices_t
    return _to_unit_float(images_t), labels_t, indices_t


def check_pixels(images: torch.Tensor, source: str) -> None:
    """Refuse NaN, infinite or out-of-range pixels: noise is added in [0,1] pixel space, and a NaN input would give
    a model output that votes for an arbitrary class instead of failing."""
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad_items = (~finite).flatten(1).any(1).nonzero().flatten()
        raise ValueError(f"{source}: {int((~finite).sum())} pixel values are NaN or infinite "
                         f"(in {len(bad_items)} images, the first at position {int(bad_items[0])})")
    low, high = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
    if low < 0 or high > 1:
        raise ValueError(f"{source}: pixel values must lie in [0, 1], got {low:g}..{high:g}")


def _to_unit_float(images_uint8: torch.Tensor) -> torch.Tensor:
    # contiguous while still uint8: the NCHW copy costs a quarter of a float copy
    return images_uint8.contiguous().float().div_(255.0)


class ImageFileDataset(Dataset):
    """Image files decoded on access, with labels ``[N]`` and dataset indices ``[N]``; item i is
    ``(transform(RGB image), y, index)``. Used where a split does not fit in memory as one tensor (ImageNet)."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, indices: torch.Tensor,
                 transform: Callable[..., torch.Tensor]):
        if not (len(paths) == len(labels) == len(indices)):
            raise ValueError(f"paths, labels, indices differ in length: {len(paths)}, {len(labels)}, {len(indices)}")
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels).long()
        self.indices = torch.as_tensor(indices).long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[position]) as image:
            x = self.transform(image.convert("RGB"))
        return x, self.labels[position], self.indices[position]

    def subset(self, positions: Sequence[int] | torch.Tensor | slice) -> ImageFileDataset:
        """The items at ``positions`` (positions in this dataset, not dataset indices), same transform."""
        chosen = torch.arange(len(self))[positions] if isinstance(positions, slice) else \
            torch.as_tensor(positions, dtype=torch.long)
        return ImageFileDataset([self.paths[p] for p in chosen.tolist()], self.labels[chosen], self.indices[chosen],
                                self.transform)


def imagenet_transform(train: bool) -> Callable[..., torch.Tensor]:
    """Cohen et al.'s ImageNet preprocessing, to a float tensor in [0,1] (normalization is the model's job):
    training: random-resized crop 224 + horizontal flip; test: resize the short side to 256, center crop 224."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train:
        return v2.Compose([v2.RandomResizedCrop(IMAGENET_CROP), v2.RandomHorizontalFlip(), *to_tensor])
    return v2.Compose([v2.Resize(IMAGENET_RESIZE), v2.CenterCrop(IMAGENET_CROP), *to_tensor])


def load_imagefolder(info: DatasetInfo, split: str, root: Path, augment: bool = False) -> ImageFileDataset:
    """One split of an ImageFolder tree: ``root/train/<class>/<image>`` or ``root/val/<class>/<image>``.

    Items are in ImageFolder's order (classes sorted by folder name, files sorted within each), so the dataset
    index of a validation image is its position in that order, as in Cohen et al.'s code: ``certify.skip=100``
    gives their 500 images. A label is the position of its class folder among the SORTED folders of
    ``root/train`` (of ``root/val`` when there is no train folder), so both splits agree on every label.
    """
    import warnings

    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = root / IMAGEFOLDER_SPLITS[split]
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (torchvision's ImageFolder layout)"
    if not folder.is_dir():
        raise FileNotFoundError(f"{info.name} {split} images not found: no folder {folder}. Set dataset.root to a "
                                f"folder laid out as {layout}")
    reference = root / IMAGEFOLDER_SPLITS["train"]
    reference = reference if reference.is_dir() else folder
    try:
        classes, class_to_idx = find_classes(str(reference))
        own_classes, _ = find_classes(str(folder))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; expected {layout}") from None
    unknown = sorted(set(own_classes) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders that {reference} lacks: {unknown[:5]}; both splits need the "
                         "same classes, or the labels would not match")
    if len(classes) > info.num_classes:
        raise ValueError(f"{reference} has {len(classes)} class folders; {info.name} has {info.num_classes} classes")
    if len(classes) != info.num_classes:
        warnings.warn(f"{reference} has {len(classes)} class folders, not {info.num_classes}: labels are positions "
                      f"among these folders and do not match models trained on all of {info.name}", stacklevel=2)
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}; expected {layout}")
    paths = [path for path, _ in samples]
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return ImageFileDataset(paths, labels, torch.arange(len(paths)), imagenet_transform(train=augment))


class SmoothingDataModule(L.LightningDataModule):
    """Train split for training, test split for validation and certification (ImageNet: its validation set).

    ``train_subset``/``val_subset``: first k items only (CPU-sized runs). The train loader shuffles with a
    generator seeded by ``seed``; under DDP Lightning swaps in a DistributedSampler, which shuffles by epoch.
    """

    def __init__(
        self,
        name: str = "digits",
        source: str = "auto",
        root: str = "data",
        npz_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool = True,
        train_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.info = dataset_info(name)
        self.source = resolve_source(name, source)
        if self.source == "npz" and not npz_dir:
            raise ValueError(f"dataset.source=npz needs dataset.npz_dir=DIR, the folder holding "
                             f"{NPZ_FILES[name, 'train']} and {NPZ_FILES[name, 'test']}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"dataset.{key} must be >= 1, got {value}")
        for key, value in (("train_subset", train_subset), ("val_subset", val_subset)):
            if value is not None and value < 1:
                raise ValueError(f"dataset.{key} must be >= 1 or null, got {value}")
        self.save_hyperparameters()
        self.name, self.root, self.npz_dir, self.download = name, root, npz_dir, download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.augment, self.train_subset, self.val_subset, self.seed = augment, train_subset, val_subset, seed
        self.train_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place that may download.
        if self.source == "torchvision" and self.download:
            for split in SPLITS:
                _load_torchvision(self.name, split, Path(self.root), download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs: the test split only for "test", "validate" and "predict" (certifying
        needs no training file), both for "fit" and None."""
        load = dict(source=self.source, root=self.root, download=self.download, npz_dir=self.npz_dir)
        if self.test_set is None:
            self.test_set = load_split(self.name, "test", **load)
        if self.train_set is None and stage not in ("test", "validate", "predict"):
            train = load_split(self.name, "train", augment=self.augment, **load)
            self.train_set = train.subset(slice(0, self.train_subset)) if self.train_subset else train

    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_set, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        val = self.test_set.subset(slice(0, self.val_subset)) if self.val_subset else self.test_set
        return self._loader(val, self.eval_batch_size, shuffle=False)

    def test_points(self, skip: int = 1, max: int | None = None, start: int = 0) -> IndexedDataset:  # noqa: A002
        """The certification subset with the semantics of Cohen et al.'s certify.py: test positions
        ``start, start + skip, ...`` below ``max`` (``max`` is a position bound, None or -1: the whole split).
        skip=20 on CIFAR-10 gives Cohen's 500 images; start=500 gives MACER's "images 500-999"."""
        if skip < 1 or start < 0:
            raise ValueError(f"certify.skip must be >= 1 and start >= 0, got skip={skip}, start={start}")
        if max is not None and max != -1 and max < 0:
            raise ValueError(f"certify.max must be >= 0, or -1 for all, got {max}")
        if max is not None and max != -1 and max <= start:
            raise ValueError(f"certify.max={max} is not above certify.start={start}: no test point is selected "
                             "(max is a position bound, like Cohen's --max)")
        self.setup("test")
        size = len(self.test_set)
        if start >= size:
            raise ValueError(f"certify.start={start} is past the end of the {self.name} test split ({size} images, "
                             f"positions 0-{size - 1})")
        stop = size if max is None or max == -1 else min(max, size)
        return self.test_set.subset(torch.arange(start, stop, skip))

    def _loader(self, dataset: IndexedDataset, batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )
