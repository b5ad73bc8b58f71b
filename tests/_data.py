"""Private test helper: where the shared data is, and a small decoded subset of the CIFAR-10 JPEG pack.

The linux-kernel-char corpus (``shared/data/linux-kernel-char/`` next to the repository, or the
folder named by ``FOP_LINUX_KERNEL_CHAR``) is found by :func:`char_corpus_path`. The CIFAR-10 pack (``shared/data/cifar10_jpeg.npz`` next to the repository, or the file named by the
environment variable ``FOP_CIFAR10``) stores every image as JPEG bytes; see the pack's README.
Only the requested images are decoded (with Pillow), and the result is cached in-process.
"""

from __future__ import annotations

import functools
import os
from io import BytesIO
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"
ENV_VAR = "FOP_CIFAR10"

# per-channel statistics of the decoded training split (the pack's README gives the means)
MEAN = np.array([0.4913, 0.4821, 0.4465], dtype=np.float32)
STD = np.array([0.247, 0.243, 0.261], dtype=np.float32)


def cifar10_path() -> Path:
    """Where the pack is expected: ``$FOP_CIFAR10`` if set, else ``<repo>/../shared/data/``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def missing_reason() -> str | None:
    """None if the pack is there, else a message saying where it was looked for."""
    path = cifar10_path()
    if path.is_file():
        return None
    return (
        f"CIFAR-10 JPEG pack not found at {path}: put cifar10_jpeg.npz there "
        f"(see shared/data/README.md) or point the {ENV_VAR} environment variable at it"
    )


def in_ci() -> bool:
    """``CI`` set to true (as GitHub Actions and most CI services do)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def require_pack() -> Path:
    """The pack's path; without it the calling test fails in CI (a missing pack must not pass as a
    skip there) and is skipped elsewhere."""
    return _required(cifar10_path(), missing_reason())


def _required(path: Path, reason: str | None) -> Path:
    """``path``, or (``reason`` given: the data is missing) a failure in CI and a skip elsewhere."""
    import pytest

    if reason is not None:
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def _balanced_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices, ``count/10`` per class, drawn with a fixed seed, in shuffled order."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = count // len(classes)
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return rng.permutation(np.concatenate(chosen))


@functools.lru_cache(maxsize=4)
def load_subset(split: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: ``count`` class-balanced images of ``split`` ("train" or "test").

    ``images`` is float32 ``(count, 3, 32, 32)``, normalised per channel; ``labels`` int64.
    """
    from PIL import Image

    with np.load(cifar10_path()) as pack:
        labels = pack[f"{split}_labels"].astype(np.int64)
        offsets = pack[f"{split}_offsets"]
        jpeg = pack[f"{split}_jpeg"]
    index = _balanced_indices(labels, count, seed)
    images = np.empty((len(index), 32, 32, 3), dtype=np.uint8)
    for row, i in enumerate(index):
        with Image.open(BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as image:
            images[row] = np.asarray(image.convert("RGB"))
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels[index]


CHAR_CORPUS_ENV_VAR = "FOP_LINUX_KERNEL_CHAR"
CHAR_CORPUS_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "linux-kernel-char"


def char_corpus_path() -> Path:
    """The linux-kernel-char folder: ``$FOP_LINUX_KERNEL_CHAR`` if set, else ``<repo>/../shared/data/``."""
    return Path(os.environ.get(CHAR_CORPUS_ENV_VAR) or CHAR_CORPUS_DEFAULT)


def require_char_corpus() -> Path:
    """The corpus folder; without it the calling test fails in CI and is skipped elsewhere (as
    :func:`require_pack`)."""
    return _required(char_corpus_path(), char_corpus_missing_reason())


def char_corpus_missing_reason() -> str | None:
    """None if the folder holds train.txt and valid.txt, else a message saying where it was looked for."""
    path = char_corpus_path()
    if (path / "train.txt").is_file() and (path / "valid.txt").is_file():
        return None
    return (
        f"linux-kernel-char corpus not found at {path}: put the folder there (see shared/data/README.md) "
        f"or point the {CHAR_CORPUS_ENV_VAR} environment variable at it"
    )
