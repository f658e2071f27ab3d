"""Calibration and evaluation data: .npy / .npz arrays or a folder of images.

- .npy: one array, for a model with one input.
- .npz: one array per model input, keyed by input name (a model with one input also accepts a
  file with a single data array under any key); optional labels under `labels`, `label` or `y`.
- a folder of .jpg/.jpeg/.png/.bmp images, read lazily batch by batch; images in class
  sub-folders get labels (sub-folder names sorted, or their integer value if all are integers).
Images and uint8 arrays (N,H,W,C or N,H,W) go through the recipe's `preprocessing` block; float
arrays must already match the model input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from onnx import helper

from .errors import DataError
from .ir import Graph

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
LABEL_KEYS = ("labels", "label", "y")


@dataclass(frozen=True)
class ModelInput:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None/str for free ones

    def describe(self) -> str:
        dims = ",".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.dtype.name}[{dims}]"


def model_inputs(graph: Graph) -> list[ModelInput]:
    result = []
    for value in graph.inputs:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.dtype)) if value.dtype else np.dtype("float32")
        result.append(ModelInput(value.name, dtype, tuple(value.shape or ())))
    return result


class Dataset:
    """Samples for the model's inputs; yields feeds batch by batch."""

    def __init__(self, source: str, count: int, labels: np.ndarray | None):
        self.source = source
        self.count = count
        self.labels = labels

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        total = min(self.count, limit) if limit else self.count
        for start in range(0, total, batch_size):
            yield self._slice(start, min(start + batch_size, total))

    def _slice(self, start: int, stop: int) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


class ArrayDataset(Dataset):
    """Arrays (memory-mapped for .npy); conversion to the model's form happens batch by batch,
    so memory holds one converted batch, not the whole converted data set."""

    def __init__(self, source: str, arrays: dict[str, np.ndarray], labels: np.ndarray | None,
                 convert: dict[str, Callable[[np.ndarray], np.ndarray]]):
        count = len(next(iter(arrays.values())))
        super().__init__(source, count, labels)
        self.arrays = arrays
        self.convert = convert

    def _slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(self.convert[name](np.asarray(a[start:stop])))
                for name, a in self.arrays.items()}


class ImageFolderDataset(Dataset):
    def __init__(self, source: str, files: list[Path], labels: np.ndarray | None, model_input: ModelInput,
                 preprocessing):
        super().__init__(source, len(files), labels)
        self.files = files
        self.input = model_input
        self.preprocessing = preprocessing

    def _slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        images = [load_image(f, self.preprocessing) for f in self.files[start:stop]]
        return {self.input.name: to_model_layout(np.stack(images), self.input, self.preprocessing, str(self.files[start]))}


def load_image(path: Path, pp) -> np.ndarray:
    """Decode, convert colour, resize the shorter side, centre-crop: uint8 HWC (or HW)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if pp.color == "grayscale" else "RGB")
            if pp.resize:
                w, h = img.size
                scale = pp.resize / min(w, h)
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            if pp.crop:
                ch, cw = (pp.crop, pp.crop) if isinstance(pp.crop, int) else pp.crop
                w, h = img.size
                if cw > w or ch > h:
                    raise DataError(f"{path}: image {w}x{h} is smaller than the crop {cw}x{ch}; set preprocessing.resize")
                left, top = (w - cw) // 2, (h - ch) // 2
                img = img.crop((left, top, left + cw, top + ch))
            array = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from None
    if pp.color == "bgr":
        array = array[..., ::-1]
    return array


def to_model_layout(pixels: np.ndarray, model_input: ModelInput, pp, source: str) -> np.ndarray:
    """uint8 N,H,W[,C] -> normalised float in the model's layout; checks the result's shape."""
    x = pixels.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    channels = x.shape[-1]
    for label, values in (("mean", pp.mean), ("std", pp.std)):
        if len(values) not in (1, channels):
            raise DataError(f"{source}: preprocessing.{label} has {len(values)} values for {channels}-channel images")
    x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    if pp.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x.astype(model_input.dtype))
    check_shape(x, model_input, source)
    return x


def check_shape(array: np.ndarray, model_input: ModelInput, source: str, count: int | None = None) -> None:
    """Samples must match the model input; the batch (first) dimension is free.

    count: the number of samples the whole data set has, for the message (array may be one sample).
    """
    expected = model_input.shape
    shown = (count if count is not None else array.shape[0],) + array.shape[1:] if array.ndim else array.shape
    got = "[" + ",".join(map(str, shown)) + "]"
    if expected and (len(expected) != array.ndim or any(isinstance(e, int) and e > 0 and e != g
                                                         for e, g in zip(expected[1:], array.shape[1:]))):
        raise DataError(f"{source}: model input '{model_input.name}' expects shape {model_input.describe()}, "
                        f"the data has {array.dtype.name}{got}")
    if array.dtype != model_input.dtype:
        raise DataError(f"{source}: model input '{model_input.name}' expects {model_input.describe()}, the data has "
                        f"{array.dtype.name}{got}")


def _converter(array: np.ndarray, model_input: ModelInput, pp, source: str) -> Callable[[np.ndarray], np.ndarray]:
    """How a batch of this array becomes model input: as is, float64 -> float32, or image
    preprocessing for uint8. Checked now on the first sample, applied later batch by batch."""
    if array.dtype == np.uint8 and model_input.dtype.kind == "f":
        if pp is None:
            raise DataError(f"{source}: model input '{model_input.name}' expects {model_input.describe()}, the data is "
                            f"uint8{list(array.shape)}; add a 'preprocessing' block to the recipe or give float arrays")
        if pp.resize or pp.crop:
            raise DataError(f"{source}: resize/crop apply to image folders; give arrays already at the model's size")
        convert = lambda batch: to_model_layout(batch, model_input, pp, source)  # noqa: E731
    elif array.dtype == np.float64 and model_input.dtype == np.float32:
        convert = lambda batch: batch.astype(np.float32)  # noqa: E731
    else:
        convert = lambda batch: batch  # noqa: E731
    if len(array):
        check_shape(convert(np.asarray(array[:1])), model_input, source, count=len(array))
    return convert


@dataclass(frozen=True)
class DataSource:
    """A picklable recipe for a data set: worker processes re-open it and read their shard."""

    path: str
    inputs: tuple[ModelInput, ...]
    preprocessing: object | None
    batch_size: int
    limit: int | None = None

    def open(self) -> Dataset:
        return load_dataset(self.path, list(self.inputs), self.preprocessing)

    def batches(self, shard: int = 0, shards: int = 1, dataset: Dataset | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches number shard, shard + shards, ... (all of them for shards=1)."""
        dataset = dataset or self.open()
        for index, batch in enumerate(dataset.batches(self.batch_size, self.limit)):
            if index % shards == shard:
                yield batch


def batch_size_for(inputs: list[ModelInput], requested: int) -> int:
    """The model's fixed batch size if its inputs pin one (e.g. 1), else the requested size."""
    fixed = {m.shape[0] for m in inputs if m.shape and isinstance(m.shape[0], int) and m.shape[0] > 0}
    if len(fixed) == 1:
        return fixed.pop()
    return requested


def load_dataset(path: str | Path, inputs: list[ModelInput], preprocessing=None) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_image_folder(path, inputs, preprocessing)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(inputs) != 1:
            raise DataError(f"{path}: a .npy file feeds a model with one input; this model has "
                            f"{len(inputs)} ({', '.join(i.name for i in inputs)}): use .npz keyed by input name")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npy file: {exc}") from None
        arrays, labels = {inputs[0].name: array}, None
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npz file: {exc}") from None
        labels = next((stored.pop(k) for k in LABEL_KEYS if k in stored), None)
        arrays = {}
        for model_input in inputs:
            if model_input.name in stored:
                arrays[model_input.name] = stored[model_input.name]
            elif len(inputs) == 1 and len(candidates := [a for a in stored.values()
                                                           if a.dtype.kind in "fiu" and a.ndim >= 2]) == 1:
                arrays[model_input.name] = candidates[0]  # the file's one data array, under any key
            else:
                raise DataError(f"{path}: no array for model input '{model_input.name}' "
                                f"(file has: {', '.join(sorted(stored)) or 'nothing'}; expected key '{model_input.name}')")
    elif suffix in IMAGE_SUFFIXES:
        raise DataError(f"{path}: give the folder that holds the images, not one image")
    else:
        raise DataError(f"{path}: unsupported data file (use .npy, .npz or a folder of .jpg/.png images)")

    convert = {m.name: _converter(arrays[m.name], m, preprocessing, str(path)) for m in inputs}
    arrays = {m.name: arrays[m.name] for m in inputs}
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise DataError(f"{path}: arrays have different sample counts {sorted(counts)}")
    count = counts.pop()
    if count == 0:
        raise DataError(f"{path}: no samples")
    batch = batch_size_for(inputs, count)
    if count % batch:
        raise DataError(f"{path}: {count} samples do not fill whole batches of {batch}, the batch size fixed by "
                        f"model input '{inputs[0].name}' {inputs[0].describe()}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != count:
            raise DataError(f"{path}: {len(labels)} labels for {count} samples")
    return ArrayDataset(str(path), arrays, labels, convert)


def _load_image_folder(path: Path, inputs: list[ModelInput], preprocessing) -> Dataset:
    if len(inputs) != 1:
        raise DataError(f"{path}: an image folder feeds a model with one input; this model has {len(inputs)}")
    if preprocessing is None:
        raise DataError(f"{path}: images need a 'preprocessing' block in the recipe (resize, crop, mean, std, layout)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no .jpg/.jpeg/.png/.bmp images found")
    labels = None
    parents = sorted({f.parent for f in files})
    if all(p != path for p in parents) and all(p.parent == path for p in parents):
        names = [p.name for p in parents]
        index = {n: int(n) for n in names} if all(n.isdigit() for n in names) else {n: i for i, n in enumerate(names)}
        labels = np.array([index[f.parent.name] for f in files], dtype=np.int64)
    dataset = ImageFolderDataset(str(path), files, labels, inputs[0], preprocessing)
    next(dataset.batches(1))  # fail now, with the file's name, if the first image does not fit
    return dataset
