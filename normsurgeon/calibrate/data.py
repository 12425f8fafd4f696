"""DATA for ``recalibrate``, ``evaluate`` and ``distill``: a spec becomes a dataset of (x, y) samples.

DATA specs:

- ``FILE.npz``: arrays ``x`` (N, ...: any per-sample shape the model takes, floating point, already normalized) and
  optionally ``y`` (N,) integer class labels. Loaded with ``allow_pickle=False``.
- ``FILE.pt`` / ``FILE.pth``: ``{"x": tensor, "y": tensor}`` (or a bare ``x`` tensor), loaded
  weights-only (no code runs).
- a folder in torchvision's ImageFolder layout (``ROOT/CLASS/IMAGE``): images are resized (shorter
  side) to ``image_size``, centre-cropped to ``image_size`` square, scaled to [0, 1] and normalized
  with ``mean``/``std`` (ImageNet's by default; one value each loads the images as grayscale).
  Labels are the class-folder indices in sorted order. Images are read lazily, batch by batch.
- ``digits``, ``digits:train``, ``digits:test``: scikit-learn's bundled handwritten digits (1797
  images of 8x8 pixels, values 0..16, shipped inside scikit-learn, no download), scaled to [0, 1]
  and upsampled bilinearly to 16x16, 1 channel, labels 0..9. ``train``/``test`` is a fixed 80/20
  split (a seeded permutation), so recalibration and evaluation can use disjoint data.

Every loader checks the data before any work: shape, dtype, finiteness (NaN/Inf), label shape.
Problems raise :class:`~normsurgeon.errors.DataError` with one line saying what to fix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from normsurgeon.errors import DataError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalization constants
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
DIGITS_SIZE = 16  # the acceptance setting: 8x8 digits upsampled to 16x16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class Dataset:
    """Samples addressed by index; ``take(index)`` returns a batch ``(x, y or None)``."""

    name: str = "data"

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError


class TensorData(Dataset):
    """Samples held in memory: ``x`` (N, C, ...) floating point, ``y`` (N,) int64 or None."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, name: str = "tensor") -> None:
        self.name = name
        self.x, self.y = check_tensors(x, y, name)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.x[index], (self.y[index] if self.y is not None else None)


class FolderData(Dataset):
    """An ImageFolder tree, read lazily; each batch is checked for NaN/Inf after normalization."""

    def __init__(self, root: Path, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        from torchvision import datasets, transforms

        self.name = str(root)
        gray = len(mean) == 1
        tf = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if gray:
            tf.append(transforms.Grayscale(1))
        tf += [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
        try:
            self.folder = datasets.ImageFolder(str(root), transform=transforms.Compose(tf))
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(
                f"{root} holds no images in ImageFolder layout ({first_line(e)}); "
                "put images in one subfolder per class, e.g. ROOT/cat/1.jpg"
            ) from None
        self._shape = (1 if gray else 3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.folder)

    @property
    def has_labels(self) -> bool:
        return True

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        xs, ys = [], []
        for i in index.tolist():
            path = self.folder.samples[i][0]
            try:
                x, y = self.folder[i]
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken image
                raise DataError(f"cannot read image {path}: {first_line(e)}") from None
            xs.append(x)
            ys.append(y)
        x = torch.stack(xs)
        if not torch.isfinite(x).all():
            raise DataError(f"images in {self.name} give NaN/Inf after normalization; check --mean/--std")
        return x, torch.tensor(ys, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ loading

def load_data(spec: str | os.PathLike, *, image_size: int | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> Dataset:
    """The dataset named by a DATA spec (see the module docstring)."""
    text = str(spec).strip()
    if not text:
        raise DataError("no DATA given: pass a .npz/.pt file, an image folder, or digits")
    path = Path(text)
    folder_opts = image_size is not None or mean is not None or std is not None
    if path.is_dir():
        return FolderData(path, *_folder_options(image_size, mean, std))
    if folder_opts:
        raise DataError("--image-size/--mean/--std apply to image folders only; "
                        f"{text} already holds tensors: store them resized and normalized")
    if not path.exists() and text.split(":")[0] == "digits":
        return load_digits(text.partition(":")[2] or "all")
    if not path.exists():
        raise DataError(f"DATA not found: {text}; pass a .npz/.pt file, an image folder, or digits")
    if path.suffix == ".npz":
        x, y = _read_npz(path)
    elif path.suffix in (".pt", ".pth"):
        x, y = _read_pt(path)
    else:
        raise DataError(f"cannot read DATA {text}: use a .npz or .pt file with x (and y), or an image folder")
    return TensorData(x, y, name=str(path))


def _folder_options(image_size, mean, std) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise DataError(f"bad --image-size {size}: use a positive pixel count, e.g. 224")
    mean = tuple(IMAGENET_MEAN if mean is None else mean)
    std = tuple(IMAGENET_STD if std is None else std)
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise DataError(f"--mean and --std need 3 values (RGB) or 1 (grayscale) each, got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise DataError(f"--std values must be positive, got {std}")
    return size, mean, std


def _read_npz(path: Path):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "x" not in keys:
                raise DataError(f"{path} has no array 'x' (found: {', '.join(keys) or 'none'}); "
                                "store the inputs as x (N,C,H,W) and labels as y (N,)")
            x = f["x"]
            y = f["y"] if "y" in keys else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError/zipfile errors
        raise DataError(f"cannot read {path}: {first_line(e)}; write it with numpy.savez(path, x=..., y=...)") from None
    return _to_tensor(x, path, "x"), (None if y is None else _to_tensor(y, path, "y"))


def _to_tensor(a, path: Path, key: str) -> torch.Tensor:
    try:
        return torch.from_numpy(a.copy())
    except TypeError:
        raise DataError(f"{key} in {path} has dtype {a.dtype}, which is not numeric") from None


def _read_pt(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of many kinds
        raise DataError(f"cannot read {path} as plain tensors ({first_line(e)}); "
                        "save a dict {'x': tensor, 'y': tensor} with torch.save") from None
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, dict) and isinstance(obj.get("x"), torch.Tensor):
        y = obj.get("y")
        if y is not None and not isinstance(y, torch.Tensor):
            raise DataError(f"y in {path} is a {type(y).__name__}, not a tensor")
        return obj["x"], y
    raise DataError(f"{path} holds no tensor 'x'; save a dict {{'x': tensor, 'y': tensor}} with torch.save")


def load_digits(split: str = "all") -> TensorData:
    """scikit-learn's bundled digits as (N, 1, 16, 16) float32 in [0, 1] with int64 labels."""
    import numpy as np
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as _sk_digits

    if split not in ("all", "train", "test"):
        raise DataError(f"unknown digits split {split!r}: use digits, digits:train or digits:test")
    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    y = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y)))
        n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
        idx = perm[:n_test] if split == "test" else perm[n_test:]
        x, y = x[idx], y[idx]
    return TensorData(x.contiguous(), y, name="digits" if split == "all" else f"digits:{split}")


# ------------------------------------------------------------------------------------------ checks

def check_tensors(x, y, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate in-memory data: x (N, C, ...) finite floating point; y (N,) integer labels."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"x in {where} is a {type(x).__name__}, not a tensor")
    if x.dim() < 2:
        raise DataError(f"x in {where} has shape {tuple(x.shape)}; need (N, C, ...) with one sample per row")
    if x.shape[0] == 0:
        raise DataError(f"x in {where} holds no samples")
    if not x.is_floating_point():
        raise DataError(f"x in {where} is {x.dtype}; store normalized floating-point inputs (e.g. float32)")
    bad = ~torch.isfinite(x)
    if bad.any():
        first = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0])
        raise DataError(f"x in {where} has {int(bad.sum())} NaN/Inf values (first in sample {first}); "
                        "clean or drop those samples")
    if y is not None:
        if not isinstance(y, torch.Tensor):
            raise DataError(f"y in {where} is a {type(y).__name__}, not a tensor")
        y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"y in {where} has shape {tuple(y.shape)}; need ({x.shape[0]},): one class index per sample")
        if y.is_floating_point():
            if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
                raise DataError(f"y in {where} holds non-integer values; store class indices")
        elif y.dtype == torch.bool or y.is_complex():
            raise DataError(f"y in {where} is {y.dtype}; store integer class indices")
        y = y.to(torch.int64)
        if (y < 0).any():
            raise DataError(f"y in {where} holds negative labels; store class indices 0..K-1")
    return x, y


def as_dataset(data, *, image_size: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> Dataset:
    """Accept a Dataset, a DATA spec, a tensor ``x``, a pair ``(x, y)``, or any other iterable of
    batches (a ``torch.utils.data.DataLoader``, a generator): each batch a tensor ``x``, a pair
    ``(x, y)`` or a dict with ``"x"`` (and ``"y"``). An iterable is read once, into memory."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, image_size=image_size, mean=mean, std=std)
    if isinstance(data, torch.Tensor):
        return TensorData(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorData(data[0], data[1])
    if hasattr(data, "__iter__"):
        return _from_batches(data)
    raise DataError(f"cannot use {type(data).__name__} as data: pass a DATA spec, a tensor x, (x, y), or an "
                    "iterable of batches such as a DataLoader")


def _from_batches(batches) -> TensorData:
    xs, ys = [], []
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            x, y = batch.get("x"), batch.get("y")
        elif isinstance(batch, (tuple, list)) and batch:
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise DataError(f"batch {i} of the data is {type(x).__name__}, not a tensor of samples: yield x, "
                            "(x, y) or {'x': x, 'y': y}")
        if ys and (y is None) != (ys[0] is None):
            raise DataError(f"batch {i} of the data {'lacks' if y is None else 'adds'} labels: label every "
                            "batch or none")
        xs.append(x.detach().cpu())
        ys.append(None if y is None else torch.as_tensor(y).detach().cpu())
    if not xs:
        raise DataError("the data yielded no batches")
    try:
        x = torch.cat(xs)
        y = None if ys[0] is None else torch.cat(ys)
    except RuntimeError as e:
        raise DataError(f"the data's batches do not stack into one set of samples ({first_line(e)})") from None
    return TensorData(x, y, name="batches")
