"""Datasets of the benchmark and the on-device batch pipeline.

Every dataset is held as ``uint8`` images of shape ``(N, H, W, C)`` with ``int64`` labels
(:class:`ImageDataset`). :class:`BatchPipeline` moves the whole dataset to the training device once;
batches are then gathered, augmented (random crop with zero padding, horizontal flip) and normalised
on that device, so the data path never shows in the timings.

Sources:

- scikit-learn's handwritten digits (ships with scikit-learn, no download): :func:`load_digits`;
- CIFAR-10 as a JPEG pack (an ``.npz`` of JPEG bytes, decoded with Pillow and
  cached as raw ``uint8``) or as the original python pickles: :func:`load_cifar10`;
- long-tailed subsampling of a training set: :func:`long_tail_counts`, :func:`long_tail_indices`;
- a character-level corpus folder (``train.txt``, ``valid.txt``; e.g. ``linux-kernel-char``) as
  token ids: :func:`load_char_corpus`, served in windows by :class:`TokenPipeline`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fop.bench.errors import BenchError

__all__ = [
    "CIFAR10_CLASSES",
    "BatchPipeline",
    "ImageDataset",
    "TokenDataset",
    "TokenPipeline",
    "balanced_indices",
    "default_cache_dir",
    "load_cifar10",
    "load_char_corpus",
    "load_digits",
    "long_tail_counts",
    "long_tail_indices",
    "random_crop",
    "random_flip",
]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_JPEG_PACK_KEYS = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels")
_CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset held in memory as ``uint8`` images ``(N, H, W, C)``.

    ``kind`` names the source (``"digits"``, ``"cifar10"`` for the original CIFAR-10,
    ``"cifar10-jpeg"`` for the JPEG pack); tasks key their default accuracy target on it.
    ``source`` says where it was read from, for reports; ``notes`` holds what a task did to the
    data (for example ``{"imbalance": 100}`` after long-tailed subsampling).
    """

    kind: str
    source: str
    classes: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_unit(self) -> str:
        """What one sample of :attr:`train_size` is, for messages."""
        return "images"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        height, width, channels = self.train_images.shape[1:]
        return int(height), int(width), int(channels)

    @property
    def train_size(self) -> int:
        return int(self.train_labels.numel())

    @property
    def test_size(self) -> int:
        return int(self.test_labels.numel())

    def class_counts(self, split: str = "train") -> list[int]:
        """Number of images of each class in ``split`` (``"train"`` or ``"test"``)."""
        labels = self.train_labels if split == "train" else self.test_labels
        return torch.bincount(labels, minlength=self.num_classes).tolist()

    def select(self, train: Tensor | None = None, test: Tensor | None = None) -> ImageDataset:
        """A dataset restricted to the given train / test indices (``None`` keeps a split whole)."""
        changes: dict[str, Any] = {}
        if train is not None:
            changes.update(train_images=self.train_images[train], train_labels=self.train_labels[train])
        if test is not None:
            changes.update(test_images=self.test_images[test], test_labels=self.test_labels[test])
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: source, sizes and training class counts."""
        return {
            "kind": self.kind,
            "source": self.source,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "train_class_counts": self.class_counts("train"),
            "test_class_counts": self.class_counts("test"),
            **self.notes,
        }


# ----------------------------------------------------------------------------------------------
# Subsets


def balanced_indices(labels: Tensor | np.ndarray, per_class: int, num_classes: int) -> Tensor:
    """Indices of the first ``per_class`` samples of every class, in dataset order, sorted."""
    return _first_of_each_class(labels, [per_class] * num_classes)


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Class sizes of the exponential long-tail profile (Cui et al. 2019, used by CIFAR-10-LT).

    ``n_c = floor(n_max · imbalance^(−c / (C − 1)))`` for class ``c = 0 … C−1``, at least 1: the
    head class keeps ``n_max`` images, the tail class ``n_max / imbalance``. For CIFAR-10 with
    imbalance 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50 (12,406 images).
    """
    if imbalance < 1:
        raise BenchError(f"imbalance factor must be >= 1, got {imbalance:g}")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail_indices(labels: Tensor | np.ndarray, num_classes: int, imbalance: float) -> Tensor:
    """Indices of a long-tailed subsample: the first :func:`long_tail_counts` images of each class.

    ``n_max`` is the size of the smallest class of ``labels`` (5,000 on CIFAR-10), so every class
    can supply its count.
    """
    available = torch.bincount(torch.as_tensor(labels), minlength=num_classes)
    return _first_of_each_class(labels, long_tail_counts(int(available.min()), num_classes, imbalance))


def _first_of_each_class(labels: Tensor | np.ndarray, counts: Sequence[int]) -> Tensor:
    labels = torch.as_tensor(labels)
    chosen = []
    for label, count in enumerate(counts):
        members = torch.nonzero(labels == label).flatten()
        if members.numel() < count:
            raise BenchError(f"class {label} has {members.numel()} samples, {count} requested")
        chosen.append(members[:count])
    return torch.sort(torch.cat(chosen)).values


def _per_class(subset: int, classes: int) -> int:
    """Images per class of a class-balanced subset of at most ``subset`` images."""
    if subset < classes:
        raise BenchError(
            f"--subset {subset} is smaller than the number of classes ({classes}): a class-balanced subset "
            f"needs one image per class at least; use --subset {classes} or more"
        )
    return subset // classes


def _limit(dataset: ImageDataset, subset: int | None) -> ImageDataset:
    """Class-balanced cut to at most ``subset`` training and ``subset`` test images."""
    if subset is None:
        return dataset
    per_class = _per_class(subset, dataset.num_classes)
    train_per_class = min(per_class, min(dataset.class_counts("train")))
    test_per_class = min(per_class, min(dataset.class_counts("test")))
    return dataset.select(
        balanced_indices(dataset.train_labels, train_per_class, dataset.num_classes),
        balanced_indices(dataset.test_labels, test_per_class, dataset.num_classes),
    )


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(subset: int | None = None, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), no download.

    Pixel values 0..16 are rescaled to 0..255. The split is stratified with a fixed seed:
    1,437 training and 360 test images.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise BenchError(f"the digits task needs scikit-learn ({exc}); pip install 'fop[bench]'") from None
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=0
    )
    dataset = ImageDataset(
        kind="digits",
        source="sklearn.datasets.load_digits",
        classes=tuple(str(d) for d in range(10)),
        train_images=torch.from_numpy(train_x),
        train_labels=torch.from_numpy(train_y),
        test_images=torch.from_numpy(test_x),
        test_labels=torch.from_numpy(test_y),
    )
    return _limit(dataset, subset)


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: ``$FOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fop``, else
    ``~/.cache/fop``."""
    if os.environ.get("FOP_CACHE_DIR"):
        return Path(os.environ["FOP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fop"


def load_cifar10(
    path: str | os.PathLike[str],
    subset: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    use_cache: bool = True,
) -> ImageDataset:
    """CIFAR-10 from the JPEG pack (an ``.npz`` file) or an original CIFAR-10 folder.

    A folder may hold the python pickles (``data_batch_1`` … ``data_batch_5``, ``test_batch``)
    directly or in ``cifar-10-batches-py/``. With ``download=True`` a missing folder is fetched
    with torchvision's downloader (needs torchvision and internet access).

    ``subset`` keeps the first ``subset // 10`` images of every class of each split (only those
    are decoded). The full JPEG pack is decoded once and cached as raw ``uint8`` in ``cache_dir``
    (default :func:`default_cache_dir`) unless ``use_cache`` is false.
    """
    path = Path(path).expanduser()
    if not path.exists():
        if not download:
            raise BenchError(
                f"CIFAR-10 data not found: {path} (give the JPEG pack .npz or a CIFAR-10 folder; "
                "--download fetches the original with torchvision)"
            )
        _download_cifar10(path)
    if path.is_dir():
        return _limit(_load_cifar10_pickles(path, download), subset)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _load_cifar10_jpeg_pack(path, subset, cache if use_cache else None)


def _download_cifar10(root: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise BenchError("--download needs torchvision (pip install torchvision)") from None
    try:
        for train in (True, False):
            CIFAR10(root=str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise BenchError(f"could not download CIFAR-10 into {root}: {exc}") from None


def _load_cifar10_pickles(folder: Path, download: bool) -> ImageDataset:
    batches = folder / _CIFAR_PICKLE_DIR if (folder / _CIFAR_PICKLE_DIR).is_dir() else folder
    missing = [name for name in (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH) if not (batches / name).is_file()]
    if missing and download:
        _download_cifar10(folder)
        return _load_cifar10_pickles(folder, download=False)
    if missing:
        raise BenchError(
            f"{folder} is not a CIFAR-10 folder: missing {', '.join(missing)} "
            "(expected the python pickles data_batch_1..5 and test_batch)"
        )
    train = [_read_cifar_pickle(batches / name) for name in _CIFAR_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar_pickle(batches / _CIFAR_TEST_BATCH)
    return ImageDataset(
        kind="cifar10",
        source=str(folder),
        classes=CIFAR10_CLASSES,
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
    )


def _unpickle(file: Path) -> dict[Any, Any]:
    try:
        with open(file, "rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise BenchError(f"corrupt CIFAR-10 file {file}: {exc}") from None
    if not isinstance(content, dict):
        raise BenchError(f"corrupt CIFAR-10 file {file}: not a dictionary")
    return content


def _read_cifar_pickle(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch as ``(N, 32, 32, 3)`` uint8 images and int64 labels."""
    content = _unpickle(file)
    try:
        data = np.asarray(content[b"data"], dtype=np.uint8)
        labels = np.asarray(content[b"labels"], dtype=np.int64)
        _check_labels(labels, len(CIFAR10_CLASSES), f"corrupt CIFAR-10 file {file}: its labels")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError) as exc:
        raise BenchError(f"corrupt CIFAR-10 file {file}: {exc}") from None
    if len(images) != len(labels):
        raise BenchError(f"corrupt CIFAR-10 file {file}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Every label a class index ``0..num_classes-1`` (else one line naming the file and the range found)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BenchError(
            f"{what} must hold class indices 0..{num_classes - 1} ({num_classes} classes), "
            f"found values {labels.min()}..{labels.max()}"
        )


def _open_jpeg_pack(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise BenchError(f"corrupt data file {path}: not a NumPy .npz archive (the CIFAR-10 JPEG pack)")
    try:
        pack = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BenchError(f"corrupt data file {path}: {exc}") from None
    missing = [key for key in _JPEG_PACK_KEYS if key not in pack.files]
    if missing:
        raise BenchError(f"{path} is not the CIFAR-10 JPEG pack: missing arrays {', '.join(missing)}")
    return pack


def _read_pack_array(pack: Any, key: str, path: Path) -> np.ndarray:
    try:
        return pack[key]
    except Exception as exc:
        raise BenchError(f"corrupt data file {path}: array {key!r} unreadable ({exc})") from None


def _load_cifar10_jpeg_pack(path: Path, subset: int | None, cache_dir: Path | None) -> ImageDataset:
    with _open_jpeg_pack(path) as pack:
        labels = {
            split: _read_pack_array(pack, f"{split}_labels", path).astype(np.int64) for split in ("train", "test")
        }
        offsets = {split: _read_pack_array(pack, f"{split}_offsets", path) for split in ("train", "test")}
        classes: tuple[str, ...] = CIFAR10_CLASSES
        if "classes" in pack.files:
            classes = tuple(str(name) for name in _read_pack_array(pack, "classes", path))
        for split in ("train", "test"):
            if len(offsets[split]) != len(labels[split]) + 1:
                raise BenchError(f"corrupt data file {path}: {split} offsets and labels disagree in length")
            _check_labels(labels[split], len(classes), f"corrupt data file {path}: array {split}_labels")
        cache_file = None
        if subset is None and cache_dir is not None:
            cache_file = cache_dir / f"cifar10_jpeg-{_pack_fingerprint(path, offsets, labels)}.npz"
            cached = _read_cache(cache_file)
            if cached is not None:
                return _cifar_jpeg_dataset(path, classes, cached, labels)
        selection: dict[str, np.ndarray] = {}
        for split in ("train", "test"):
            n = len(labels[split])
            if subset is None:
                selection[split] = np.arange(n)
            else:
                per_class = _per_class(subset, len(classes))
                counts = np.bincount(labels[split], minlength=len(classes))
                selection[split] = balanced_indices(
                    labels[split], min(per_class, int(counts.min())), len(classes)
                ).numpy()
        images = {
            split: _decode_jpegs(_read_pack_array(pack, f"{split}_jpeg", path), offsets[split], selection[split], path)
            for split in ("train", "test")
        }
    labels = {split: labels[split][selection[split]] for split in ("train", "test")}
    if cache_file is not None:
        _write_cache(cache_file, images)
    return _cifar_jpeg_dataset(path, classes, images, labels)


def _cifar_jpeg_dataset(
    path: Path, classes: tuple[str, ...], images: dict[str, np.ndarray], labels: dict[str, np.ndarray]
) -> ImageDataset:
    return ImageDataset(
        kind="cifar10-jpeg",
        source=str(path),
        classes=classes,
        train_images=torch.from_numpy(np.ascontiguousarray(images["train"])),
        train_labels=torch.from_numpy(labels["train"]),
        test_images=torch.from_numpy(np.ascontiguousarray(images["test"])),
        test_labels=torch.from_numpy(labels["test"]),
    )


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray, path: Path) -> np.ndarray:
    """Decode the JPEG images ``indices`` of a pack split into ``(n, H, W, 3)`` uint8.

    Sequential on purpose: Pillow holds the GIL for images this small, and threads measured slower.
    """
    try:
        from PIL import Image
    except ImportError:
        raise BenchError("the CIFAR-10 JPEG pack needs Pillow; pip install 'fop[bench]'") from None

    def decode(index: int) -> np.ndarray:
        start, end = int(offsets[index]), int(offsets[index + 1])
        if not 0 <= start < end <= len(blob):
            raise BenchError(f"corrupt data file {path}: image {index} has offsets {start}..{end}")
        try:
            with Image.open(io.BytesIO(blob[start:end].tobytes())) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise BenchError(f"corrupt data file {path}: image {index} does not decode ({exc})") from None

    if len(indices) == 0:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    decoded = [decode(index) for index in indices.tolist()]
    shapes = {image.shape for image in decoded}
    if len(shapes) != 1:
        raise BenchError(f"corrupt data file {path}: images of different sizes {sorted(shapes)[:3]}")
    return np.stack(decoded)


def _pack_fingerprint(path: Path, offsets: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    for split in ("train", "test"):
        digest.update(offsets[split].tobytes())
        digest.update(labels[split].tobytes())
    return digest.hexdigest()[:16]


def _read_cache(file: Path) -> dict[str, np.ndarray] | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as cached:
            return {"train": cached["train"], "test": cached["test"]}
    except Exception:  # a damaged cache is rebuilt
        return None


def _write_cache(file: Path, images: dict[str, np.ndarray]) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, train=images["train"], test=images["test"])
        os.replace(partial, file)
    except OSError:  # an unwritable cache only costs decoding time next run
        pass


# ----------------------------------------------------------------------------------------------
# On-device augmentation and batching


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Random ``H x W`` crops of the zero-padded ``(N, H, W, C)`` images, one offset per image."""
    n, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device=device)
    rows = dy + torch.arange(height, device=device).view(1, height, 1)
    cols = dx + torch.arange(width, device=device).view(1, 1, width)
    return padded[torch.arange(n, device=device).view(n, 1, 1), rows, cols]


def random_flip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Horizontal flip of each ``(N, H, W, C)`` image with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)


class BatchPipeline:
    """The dataset resident on ``device`` as ``uint8``, serving normalised float batches.

    Training batches are gathered by index, augmented on the device when ``crop_padding`` is set
    (random crop with that zero padding, then a random horizontal flip) and normalised with the
    training set's per-channel mean and standard deviation. Batches come out as ``(N, C, H, W)``
    float32 in ``channels_last`` memory format (a free view of the ``NHWC`` storage) or contiguous.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        device: torch.device | str,
        crop_padding: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.crop_padding = crop_padding
        self.channels_last = channels_last
        self.train_images = dataset.train_images.to(self.device)
        self.train_labels = dataset.train_labels.to(self.device)
        self.test_images = dataset.test_images.to(self.device)
        self.test_labels = dataset.test_labels.to(self.device)
        mean, std = _channel_stats(dataset.train_images)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, -1, 1, 1).to(self.device)

    @property
    def train_size(self) -> int:
        return int(self.train_labels.numel())

    def train_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Augmented, normalised training images ``indices`` and their labels."""
        images = self.train_images[indices]
        if self.crop_padding:
            images = random_flip(random_crop(images, self.crop_padding, generator), generator)
        return self._normalise(images), self.train_labels[indices]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, normalised, in chunks of ``batch_size``."""
        for start in range(0, int(self.test_labels.numel()), batch_size):
            stop = start + batch_size
            yield self._normalise(self.test_images[start:stop]), self.test_labels[start:stop]

    held_out_batches = test_batches  # what the runner evaluates on, for every pipeline

    def _normalise(self, images: Tensor) -> Tensor:
        batch = images.permute(0, 3, 1, 2).float().mul_(self._scale).add_(self._shift)
        return batch if self.channels_last else batch.contiguous()


def _channel_stats(images: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``uint8`` ``(N, H, W, C)`` images, in [0, 1]."""
    channels = images.shape[-1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].reshape(-1, channels).to(torch.float64) / 255.0
        total += block.sum(0)
        squares += block.square().sum(0)
    count = max(1, images[..., 0].numel())
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


# ----------------------------------------------------------------------------------------------
# Character-level language modelling


UNKNOWN = "\ufffd"  # shown for the unknown id 0 (characters not in the training split)
_CHAR_SPLITS = ("train.txt", "valid.txt")


@dataclass(frozen=True)
class TokenDataset:
    """A character-level corpus as token ids, cut into windows of ``context`` tokens.

    ``vocabulary[i]`` is the character of id ``i``; id 0 is the unknown id, which every character
    absent from the training split maps to. ``train_tokens`` and ``valid_tokens`` are ``int64``
    1-D tensors. A *sample* is a window: the training split holds :attr:`train_size` windows of
    ``context`` inputs with their ``context`` next-token targets, the validation split
    :attr:`test_size` non-overlapping ones (the reports call the held-out split "test" for every
    task).
    """

    kind: str
    source: str
    vocabulary: tuple[str, ...]
    context: int
    train_tokens: Tensor
    valid_tokens: Tensor
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def sample_unit(self) -> str:
        """What one sample of :attr:`train_size` is, for messages."""
        return f"windows of {self.context} characters"

    @property
    def train_size(self) -> int:
        return (int(self.train_tokens.numel()) - 1) // self.context

    @property
    def test_size(self) -> int:
        return (int(self.valid_tokens.numel()) - 1) // self.context

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: source, sizes in windows and tokens, vocabulary."""
        unknown_valid = int((self.valid_tokens == 0).sum())
        return {
            "kind": self.kind,
            "source": self.source,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "context": self.context,
            "vocab_size": self.vocab_size,
            "train_tokens": int(self.train_tokens.numel()),
            "valid_tokens": int(self.valid_tokens.numel()),
            "unknown_valid_tokens": unknown_valid,
            "description": (
                f"{self.train_tokens.numel()} training / {self.valid_tokens.numel()} validation characters, "
                f"{self.vocab_size} token ids (one unknown id; {unknown_valid} validation characters unknown), "
                f"windows of {self.context}: {self.train_size} train / {self.test_size} validation windows"
            ),
            **self.notes,
        }


def load_char_corpus(path: str | os.PathLike[str], context: int, subset: int | None = None) -> TokenDataset:
    """A character-level corpus folder (``train.txt``, ``valid.txt``) as token ids.

    The files are read as UTF-8 with ``errors="replace"``. The vocabulary is every distinct
    character of the whole ``train.txt``, sorted, after the unknown id 0; a validation character
    absent from it becomes the unknown id. ``subset`` keeps the first ``subset`` characters of each
    split (quick runs, tests); the vocabulary stays the whole training split's.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise BenchError(
            f"character corpus not found: {folder} (give the folder holding train.txt and valid.txt, "
            "e.g. data/linux-kernel-char)"
        )
    if not folder.is_dir():
        raise BenchError(f"{folder} is a file: give the folder holding train.txt and valid.txt")
    missing = [name for name in _CHAR_SPLITS if not (folder / name).is_file()]
    if missing:
        raise BenchError(f"{folder} is not a character corpus folder: missing {', '.join(missing)}")
    texts = {name: _read_text(folder / name) for name in _CHAR_SPLITS}
    vocabulary = (UNKNOWN, *sorted(set(texts["train.txt"])))
    ids = {char: index for index, char in enumerate(vocabulary) if index}
    tokens = {}
    for name, text in texts.items():
        if subset is not None:
            text = text[:subset]
        if len(text) < context + 1:
            raise BenchError(
                f"{folder / name} has {len(text)} characters, fewer than one window of {context} + 1"
                + (" (raise --subset)" if subset is not None else "")
            )
        tokens[name] = torch.tensor([ids.get(char, 0) for char in text], dtype=torch.int64)
    return TokenDataset(
        kind=folder.name,
        source=str(folder),
        vocabulary=vocabulary,
        context=context,
        train_tokens=tokens["train.txt"],
        valid_tokens=tokens["valid.txt"],
    )


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise BenchError(f"cannot read {file}: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise BenchError(f"{file} is not a text file (it contains NUL bytes)")
    text = raw.decode("utf-8", errors="replace")
    if len(set(text)) < 2:
        raise BenchError(f"{file} holds {len(set(text))} distinct characters: not a text corpus")
    return text


class TokenPipeline:
    """A :class:`TokenDataset` resident on ``device``, serving windows of token ids.

    Training sample ``i`` is the window starting in block ``i`` of ``context`` tokens, at an offset
    drawn uniformly in ``[0, context)`` each time it is served (one pass over the samples covers
    every token about once, and each epoch sees shifted windows); its targets are the next tokens.
    The validation split is served in its non-overlapping windows, in order (its last
    ``(len − 1) mod context`` characters are not scored).
    """

    def __init__(self, dataset: TokenDataset, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.context = dataset.context
        self.train_tokens = dataset.train_tokens.to(self.device)
        self.valid_tokens = dataset.valid_tokens.to(self.device)
        self._train_windows = dataset.train_size
        self._valid_windows = dataset.test_size
        self._positions = torch.arange(self.context + 1, device=self.device)

    @property
    def train_size(self) -> int:
        return self._train_windows

    def train_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Input ids ``(n, context)`` and next-token targets ``(n, context)`` of windows ``indices``."""
        room = int(self.train_tokens.numel()) - 1 - self.context  # the last window start that fits
        shift = torch.randint(0, self.context, (indices.numel(),), generator=generator, device=self.device)
        starts = (indices * self.context + shift).clamp_max(room)
        windows = self.train_tokens[starts[:, None] + self._positions]
        return windows[:, :-1], windows[:, 1:]

    def held_out_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation windows in order, in chunks of ``batch_size`` windows."""
        for first in range(0, self._valid_windows, batch_size):
            count = min(batch_size, self._valid_windows - first)
            starts = (torch.arange(first, first + count, device=self.device) * self.context)[:, None]
            windows = self.valid_tokens[starts + self._positions]
            yield windows[:, :-1], windows[:, 1:]
