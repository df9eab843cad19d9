"""Evaluation data: Fashion-MNIST from local idx files, saved datasets, or Hub datasets.

Repair itself needs no data; this module exists to *measure* a repair (clean accuracy,
attack success) and to train the benchmark zoo. Everything is turned into pixel-space
tensors in [0, 1] that match a model's :class:`~otbr_hub.load.InputSpec`, so triggers are
applied before normalisation, exactly as an attacker would stamp them on an image.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import numbers
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .load import InputSpec

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = Path(os.environ.get("OTBR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_FILES = {"train": "train", "test": "t10k"}
_FMNIST_ALIASES = {"fashion_mnist", "fashion-mnist", "fmnist"}

IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class", "target")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST container format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_path(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise UsageError(f"Fashion-MNIST file {stem}(.gz) not found under {root}")


def fashion_mnist_arrays(split: str = "test", root: str | Path = FASHION_MNIST_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images [N, 28, 28] and labels [N]; the fast path used for training."""
    if split not in _FMNIST_FILES:
        raise UsageError(f"Fashion-MNIST has splits {', '.join(_FMNIST_FILES)}, not '{split}'")
    root = Path(root)
    prefix = _FMNIST_FILES[split]
    images = _read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise UsageError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def fashion_mnist(split: str = "test", root: str | Path = FASHION_MNIST_ROOT):
    """Fashion-MNIST as a ``datasets.Dataset`` with ``image`` (Image) and ``label`` (ClassLabel)."""
    import datasets

    images, labels = fashion_mnist_arrays(split, root)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_LABELS))}
    )
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": labels.astype(np.int64).tolist()},
        features=features,
        split=split,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _pick_split(obj: Any, split: str, source: str):
    """Return the requested split when ``obj`` is a DatasetDict, else ``obj`` itself."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise UsageError(f"{source} has no split '{split}'; it has {', '.join(obj)}")
        return obj[split]
    return obj


def describe_eval_source(name_or_path: str | Path, split: str = "test") -> tuple[str, str | None]:
    """What a card may say about ``--eval-dataset``: a public name and the split used.

    The Fashion-MNIST aliases become ``fashion_mnist``; a local folder is named by its last
    component only (a model card is public, the path is not); a folder holding a single
    ``Dataset`` (no ``dataset_dict.json``) has no split."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.lower() in _FMNIST_ALIASES and not path.exists():
        return "fashion_mnist", split
    if path.exists():
        return path.name, split if (path / "dataset_dict.json").is_file() else None
    return text, split


class _RetryNotes(logging.Filter):
    """huggingface_hub's retry warnings ("... thrown while requesting HEAD ...", "Retrying in
    1s") go to otbr-hub's log (shown with -v): an unreachable dataset ends in one error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.info("%s", record.getMessage().splitlines()[0] if record.getMessage() else "retrying")
        return False


@contextlib.contextmanager
def _retries_to_log() -> Iterator[None]:
    notes, hub_http = _RetryNotes(), logging.getLogger("huggingface_hub.utils._http")
    hub_http.addFilter(notes)
    try:
        yield
    finally:
        hub_http.removeFilter(notes)


def load_eval_dataset(name_or_path: str | Path, split: str = "test"):
    """Load evaluation data: ``fashion_mnist``, a ``save_to_disk`` folder, or a Hub dataset id."""
    import datasets

    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.lower() in _FMNIST_ALIASES and not path.exists():  # a folder of that name is the user's own data
        return fashion_mnist(split)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path} is not a folder saved with Dataset.save_to_disk")
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several unrelated types here
            raise UsageError(f"cannot read dataset folder {path}: {_first_line(err)}") from None
        return _pick_split(loaded, split, str(path))
    try:
        with _retries_to_log():
            loaded = datasets.load_dataset(text, split=split)
    except Exception as err:
        raise UsageError(f"cannot load dataset '{text}' (split '{split}'): {_first_line(err)}") from None
    return _pick_split(loaded, split, text)


def find_columns(ds) -> tuple[str, str]:
    """Names of the image and label columns, by feature type first and then by common names."""
    import datasets

    features = ds.features
    names = list(features)
    images = [n for n in names if isinstance(features[n], datasets.Image)]
    # a usual name wins among image columns (a dataset may carry a mask too), and a ClassLabel
    # with a usual name, then any ClassLabel, among label columns (a 'class' string column is not one)
    image_col = next((n for n in IMAGE_COLUMNS if n in images), images[0] if images else None)
    if image_col is None:
        image_col = next((n for n in IMAGE_COLUMNS if n in features), None)
    class_labels = [n for n in names if isinstance(features[n], datasets.ClassLabel)]
    label_col = next((n for n in LABEL_COLUMNS if n in class_labels), class_labels[0] if class_labels else None)
    if label_col is None:
        label_col = next((n for n in LABEL_COLUMNS if n in features), None)
    if image_col is None:
        raise UsageError(f"dataset has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has {', '.join(names)})")
    if label_col is None:
        raise UsageError(f"dataset has no label column (looked for {', '.join(LABEL_COLUMNS)}; it has {', '.join(names)})")
    return image_col, label_col


def dataset_num_classes(ds) -> int | None:
    """Number of classes declared by the label column's ClassLabel feature, if it has one."""
    import datasets

    _, label_col = find_columns(ds)
    feature = ds.features[label_col]
    return int(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else None


def _to_chw(image: Any, channels: int) -> torch.Tensor:
    """One image (PIL, array or tensor) as float [C, h, w] in [0, 1] with the wanted channels."""
    from PIL import Image as PILImage

    if isinstance(image, (str, bytes, Path)) or image is None:
        raise UsageError("the image column holds file paths or bytes, not images; make it an image column first "
                         "(ds.cast_column('image', datasets.Image()))" if image is not None else "an image is missing (None)")
    if isinstance(image, PILImage.Image) and (image.mode in ("I", "F") or image.mode.startswith("I;16")):
        image = np.asarray(image)  # 16-bit and float greyscale: PIL's convert() would clip them to 8 bits
    if isinstance(image, PILImage.Image):
        image = image.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(image, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr.copy())
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    else:
        t = _pixels(np.asarray(image))
        if t.dim() == 2:
            t = t[None]
        elif t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)  # HWC -> CHW
        if t.dim() == 3 and t.shape[-1] == 2 and t.shape[0] != 2:
            t = t.permute(2, 0, 1)  # grey + alpha, HWC
        if t.dim() != 3:
            raise UsageError(f"an image has shape {tuple(t.shape)}; expected (H, W), (H, W, C) or (C, H, W)")
        if t.shape[0] == 4:
            t = t[:3]
        elif t.shape[0] == 2:
            t = t[:1]  # grey + alpha: the grey
    if t.shape[0] == channels:
        return t
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114])[: t.shape[0]]
        return (t * weights.view(-1, 1, 1) / weights.sum()).sum(0, keepdim=True)
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1).clone()
    raise UsageError(f"cannot turn a {t.shape[0]}-channel image into {channels} channels")


def _pixels(arr: np.ndarray) -> torch.Tensor:
    """An array's values as pixels in [0, 1]: 8-bit (0..255) and 16-bit (0..65535) integers by
    their range, floats as [0, 1] (or 0..255 when larger). Negative values mean the images
    were normalised already (``pixel_values``); normalising them again would measure nothing."""
    if arr.dtype == np.bool_ or not arr.size:
        return torch.as_tensor(arr).float()
    low, high = float(arr.min()), float(arr.max())
    floating = np.issubdtype(arr.dtype, np.floating)
    t = torch.from_numpy(np.array(arr, dtype=np.float32))
    if low < 0:
        raise UsageError(f"an image has negative values (down to {low:.3g}): give raw pixels (0..255, or 0..1), "
                         "not images normalised for a model")
    if floating:
        scale = 1.0 if high <= 1.0 else 255.0
    elif arr.dtype in (np.uint8, np.int8):
        scale = 255.0
    elif arr.dtype in (np.uint16, np.int16):  # 16-bit images: their dtype says the range, dark or not
        scale = 65535.0
    else:  # wider integers (PIL's 'I' mode, lists of ints): by their values
        scale = 255.0 if high <= 255 else 65535.0
    if high > 65535.0 or (floating and high > 255.0):
        raise UsageError(f"an image has values up to {high:.3g}: expected 0..1, 0..255 or 0..65535 pixels")
    return (t / scale).clamp(0, 1)


PAD_MAX = 4
"""Images at most this many pixels smaller than the input in each direction (and no larger)
are padded rather than resized: the classic 28 -> 32 px MNIST-style padding."""


def _fit_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fit a batch [N, C, h, w] to (height, width).

    Images a few pixels smaller than the input (at most :data:`PAD_MAX` per direction, e.g.
    28 -> 32, as the zoo was trained) get black borders, pixels intact; anything else is
    resized (antialiased), as an image processor would: a 200 px image padded to 224 px, or
    a 32 px one in the middle of a 224 px black canvas, would measure nothing a user cares about.
    """
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if 0 <= height - h <= PAD_MAX and 0 <= width - w <= PAD_MAX:
        top, left = (height - h) // 2, (width - w) // 2
        return F.pad(x, (left, width - w - left, top, height - h - top))
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=h > height or w > width,
                         align_corners=False).clamp(0, 1)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of size ``limit``, or None for everything
    (:func:`to_tensors`'s rows; :func:`otbr_hub.evaluate.check_evaluation` checks the same)."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(0, limit)].sort().values


def class_ids(values: Any, label_col: str) -> list[int]:
    """Labels as ints; a float label must be a whole number (``3.0``), since ``int(0.5)``
    would quietly measure the image against class 0."""
    out = []
    try:
        for v in values:
            i = int(v)
            if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and i != v:
                raise ValueError
            out.append(i)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"label column '{label_col}' does not hold integer class ids") from None
    return out


def to_tensors(ds, spec: InputSpec, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a dataset into (x float [N, C, H, W] in [0, 1], y long [N]) matching ``spec``.

    With ``limit`` a seeded random subset is taken, so a dataset sorted by class still
    gives a fair sample.
    """
    image_col, label_col = find_columns(ds)
    idx = subset_indices(len(ds), limit, seed)
    if idx is not None:
        ds = ds.select(idx.tolist())
    y = torch.tensor(class_ids(ds[label_col], label_col), dtype=torch.long)
    images = [_fit_size(_to_chw(img, spec.channels)[None], spec.height, spec.width)[0] for img in ds[image_col]]
    x = torch.stack(images) if images else torch.empty((0, spec.channels, spec.height, spec.width))
    return x.float().contiguous(), y


def fashion_mnist_tensors(
    split: str,
    spec: InputSpec,
    limit: int | None = None,
    seed: int = 0,
    root: str | Path = FASHION_MNIST_ROOT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST straight from the idx arrays (no PNG round trip), fitted to ``spec``.

    Gives the same tensors as ``to_tensors(fashion_mnist(split), spec, limit, seed)``,
    only much faster, which matters when training on all 60k images.
    """
    images, labels = fashion_mnist_arrays(split, root)
    idx = subset_indices(len(labels), limit, seed)
    if idx is not None:
        images, labels = images[idx.numpy()], labels[idx.numpy()]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    if spec.channels != 1:
        x = x.expand(-1, spec.channels, -1, -1)
    return _fit_size(x, spec.height, spec.width).contiguous(), torch.from_numpy(labels.astype(np.int64))
