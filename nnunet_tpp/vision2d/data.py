"""2D datasets for classification and segmentation: the layouts of the papers' datasets, read with Pillow,
resized, normalised and (training split only) augmented with torch.

Layouts (detected from ``path``):
    ``*.npz``        MedMNIST: ``{train,val,test}_{images,labels}``.
    MHIST            a folder with ``annotations.csv`` (``Image Name``, ``Majority Vote Label``, ``Partition``)
                     and ``images/``.
    class folders    ``root/{train,val,test}/<class>/*`` or ``root/<class>/*`` (Retinal OCT-C8, Chest X-ray PA).
    image + mask     ``root/images`` + ``root/masks`` (same stem; GlaS ``<stem>_anno``, QaTa ``mask_<name>``
                     accepted), optionally ``root/{train,test}/{images,masks}`` (GlaS, QaTa-COV19).

Splits where the data gives none: 70/10/20 train/val/test, stratified by class for classification. The
test split is drawn with seed 0 whatever the run's seed, so every seed is tested on the same images; the
run's seed draws train/val from the rest. Given train/test only: val = 10% of train (stratified, by seed).

Masks: values above 127 are foreground (class 1) when the mask holds only 0 and 255-like values (JPEG
noise included); masks whose values are all small integers (< 32) are taken as class indices.

Normalisation: pixels to [0, 1], then (x - 0.5) / 0.5 for grey images and ImageNet mean/std for RGB.
Decoded, resized images are cached in memory; augmentation runs on the cached tensors.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset that cannot be read: unknown layout, unreadable files, missing masks, empty splits."""


def read_image(path: Path) -> np.ndarray:
    """An image file as a float32 array in [0, 1], (H, W) grey or (H, W, 3) RGB; DataError naming the file."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(img, dtype=np.float32)
                return arr / max(float(arr.max()), 1.0)
            img = img.convert("RGB") if img.mode in ("RGBA", "P", "CMYK", "LA") else img
            arr = np.asarray(img.convert("L") if img.mode not in ("RGB", "L") else img, dtype=np.float32)
    except Exception as e:  # Pillow raises several types for corrupt files
        raise DataError(f"cannot read image {path}: {e}") from None
    return arr / 255.0


def _to_tensor(arr: np.ndarray, in_chans: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 3 and in_chans == 1:
        t = (t * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    elif t.shape[0] == 1 and in_chans == 3:
        t = t.expand(3, -1, -1)
    return t


def _resize(t: torch.Tensor, size: int, mask: bool = False) -> torch.Tensor:
    if tuple(t.shape[-2:]) == (size, size):
        return t
    if mask:
        return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def normalise(t: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (C, H, W) -> zero-centred inputs (grey: 0.5/0.5, RGB: ImageNet statistics)."""
    if t.shape[0] == 3:
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return (t - mean) / std
    return (t - 0.5) / 0.5


def mask_to_labels(mask: np.ndarray) -> np.ndarray:
    """A mask image (values in [0, 1] after reading) -> int64 class map, by the module's rule."""
    values = np.round(mask * 255).astype(np.int64)
    if values.ndim == 3:
        values = values.max(-1)
    if values.max() < 32:
        return values
    return (values > 127).astype(np.int64)


class ImageDataset(Dataset):
    """Cached images (C, S, S) in [0, 1] with class labels or masks; yields normalised, augmented samples.

    Args:
        images: (N, C, S, S) float tensor in [0, 1].
        targets: (N,) int64 classes, or (N, S, S) int64 masks.
        task: ``cls`` or ``seg``.
        augment: random transforms (training split only).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, task: str, augment: bool):
        self.images, self.targets, self.task, self.augment = images, targets, task, augment

    def __len__(self) -> int:
        return len(self.images)

    def with_augment(self, augment: bool) -> "ImageDataset":
        """The same images with augmentation switched on or off."""
        return ImageDataset(self.images, self.targets, self.task, augment)

    def __getitem__(self, i: int):
        image, target = self.images[i], self.targets[i]
        if self.augment:
            image, target = (_augment_cls(image), target) if self.task == "cls" else _augment_seg(image, target)
        return normalise(image), target


def _augment_cls(image: torch.Tensor) -> torch.Tensor:
    """Random resized crop (scale 0.6-1, aspect 3/4-4/3) and horizontal flip."""
    size = image.shape[-1]
    area = size * size * float(torch.empty(1).uniform_(0.6, 1.0))
    ratio = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3))))
    h = int(min(size, round((area / ratio) ** 0.5)))
    w = int(min(size, round((area * ratio) ** 0.5)))
    top, left = int(torch.randint(0, size - h + 1, ())), int(torch.randint(0, size - w + 1, ()))
    crop = image[:, top:top + h, left:left + w]
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return out.flip(-1) if torch.rand(()) < 0.5 else out


def _augment_seg(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips and 90-degree rotation for image and mask."""
    k = int(torch.randint(0, 4, ()))
    image, mask = image.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1))
    if torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if torch.rand(()) < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    return image.contiguous(), mask.contiguous()


@dataclass
class DatasetSplits:
    """Train / val / test datasets of one source.

    Attributes:
        train: augmented training split (when augment was asked); ``train_plain``: the same, not augmented.
        num_classes: classes (segmentation: including background).
        class_names: names in label order.
        in_chans: image channels the datasets yield.
        layout: the detected layout.
        test_names: the test images' file stems in order, where the data gives a test folder (else None).
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    class_names: list[str]
    in_chans: int
    layout: str
    test_names: list[str] | None = None

    @property
    def train_plain(self) -> ImageDataset:
        return self.train.with_augment(False)

    def describe(self) -> str:
        """One line per split with its size and (classification) the count per class."""
        lines = [f"dataset ({self.layout}): {self.num_classes} classes {self.class_names}, {self.in_chans} channel(s)"]
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            counts = ""
            if ds.task == "cls":
                counts = " " + str(np.bincount(ds.targets.numpy(), minlength=self.num_classes).tolist())
            lines.append(f"  {name}: {len(ds)} images{counts}")
        return "\n".join(lines)


def _has_images(folder: Path) -> bool:
    """True when ``folder`` or a sub-folder holds at least one image file (stops at the first)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _load_images(paths: list[Path], size: int, in_chans: int) -> torch.Tensor:
    errors, out = [], []
    for p in paths:
        try:
            out.append(_resize(_to_tensor(read_image(p), in_chans), size))
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError(f"{len(errors)} unreadable image(s):\n  " + "\n  ".join(errors))
    return torch.stack(out)


def _channels_of(paths: list[Path]) -> int:
    return 3 if read_image(paths[0]).ndim == 3 else 1


def _split(labels: np.ndarray | None, n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Index arrays for ``fractions`` of ``n`` items, stratified by ``labels`` when given."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None else [np.arange(n)]
    parts = [[] for _ in fractions]
    for idx in groups:
        idx = rng.permutation(idx)
        bounds = np.round(np.cumsum(fractions) / sum(fractions) * len(idx)).astype(int)
        for k, (a, b) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
            parts[k].extend(idx[a:b])
    for k, part in enumerate(parts):  # small data: give an empty part one item of the largest one
        largest = max(range(len(parts)), key=lambda j: len(parts[j]))
        if not part and fractions[k] > 0 and len(parts[largest]) > 1:
            part.append(parts[largest].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _three_way(labels, n, seed):
    """70/10/20 with a seed-0 test split and a seeded train/val split of the rest."""
    rest, test = _split(labels, n, (0.8, 0.2), 0)
    train, val = _split(labels[rest] if labels is not None else None, len(rest), (7, 1), seed)
    return rest[train], rest[val], test


def detect_layout(path: Path) -> str:
    """The layout of the dataset at ``path``: ``npz`` (a MedMNIST file), ``mhist`` (``annotations.csv``),
    ``image_mask`` (an ``images`` folder: segmentation) or ``class_folders``.

    Raises:
        DataError: ``path`` is neither an ``.npz`` file nor a folder.
    """
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if not path.is_dir():
        raise DataError(f"{path}: not an .npz file or a dataset folder")
    if (path / "annotations.csv").is_file():
        return "mhist"
    if (path / "images").is_dir() or ((path / "train" / "images").is_dir()):
        return "image_mask"
    return "class_folders"


def _npz(path: Path, in_chans: int | None):
    data = np.load(path)
    missing = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels") if f"{s}_{k}" not in data]
    if missing:
        raise DataError(f"{path}: missing arrays {missing} (expected MedMNIST keys {{train,val,test}}_{{images,labels}})")
    out = {}
    for s in ("train", "val", "test"):
        images, labels = data[f"{s}_images"], data[f"{s}_labels"]
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"{path}: multi-label targets ({labels.shape[1]} per image) are not supported")
        arr = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else max(float(images.max()), 1.0))
        in_chans = in_chans or (3 if arr.ndim == 4 else 1)
        out[s] = ([_to_tensor(a, in_chans) for a in arr], labels.reshape(-1).astype(np.int64))
    return out, in_chans


def load_dataset(path: str | Path, task: str, img_size: int, in_chans: int | None = None, seed: int = 0,
                 label_fraction: float = 1.0, augment: bool = True, layout: str | None = None) -> DatasetSplits:
    """Reads a dataset into train/val/test splits at ``img_size`` x ``img_size``.

    Args:
        path: the dataset (see the module docstring for layouts).
        task: ``cls`` or ``seg`` (segmentation needs the image + mask layout).
        in_chans: channels to yield (None: the data's own; 3 repeats grey, 1 converts RGB to luminance).
        seed: draws the train/val split and the label subset.
        label_fraction: keep this fraction of the training labels (stratified); val/test unchanged.
        augment: random transforms on the training split.
        layout: force a layout (``npz``, ``mhist``, ``class_folders``, ``image_mask``).
    Returns:
        :class:`DatasetSplits`. Raises :class:`DataError` naming what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    if path.is_dir() and not (path / "annotations.csv").is_file() and not _has_images(path):
        raise DataError(f"{path}: found no images (no {', '.join(sorted(IMAGE_SUFFIXES))} files in it or its "
                        f"sub-folders); point --data at a dataset folder or a MedMNIST .npz")
    layout = layout or detect_layout(path)
    if (task == "seg") != (layout == "image_mask"):
        raise DataError(f"{path}: a {layout} dataset cannot be used for task {task!r}"
                        + (" (segmentation needs images/ + masks/)" if task == "seg" else ""))
    if layout == "image_mask":
        splits, in_chans, names, test_names = _image_mask(path, img_size, in_chans, seed)
    else:
        test_names = None
        splits, in_chans, names = _classification(path, layout, img_size, in_chans, seed)
    train_x, train_y = splits["train"]
    if label_fraction < 1.0:
        keep, _ = _split(train_y.numpy() if task == "cls" else None, len(train_x),
                         (label_fraction, 1 - label_fraction), seed + 1)
        keep = keep if len(keep) else np.array([0])
        train_x, train_y = train_x[keep], train_y[keep]
    for name, (x, _) in {**splits, "train": (train_x, train_y)}.items():
        if len(x) == 0:
            raise DataError(f"{path}: the {name} split is empty")
    num_classes = len(names)
    return DatasetSplits(ImageDataset(train_x, train_y, task, augment),
                         ImageDataset(*splits["val"], task, False), ImageDataset(*splits["test"], task, False),
                         num_classes, names, in_chans, layout, test_names)


def _classification(path: Path, layout: str, size: int, in_chans: int | None, seed: int):
    if layout == "npz":
        raw, in_chans = _npz(path, in_chans)
        splits = {s: (torch.stack([_resize(t, size) for t in x]), torch.from_numpy(y)) for s, (x, y) in raw.items()}
        n = int(max(int(y.max()) for _, y in splits.values())) + 1
        return splits, in_chans, [str(i) for i in range(n)]
    if layout == "mhist":
        rows = list(csv.DictReader((path / "annotations.csv").open()))
        names = sorted({r["Majority Vote Label"] for r in rows})
        items = {s: [(path / "images" / r["Image Name"], names.index(r["Majority Vote Label"])) for r in rows
                     if r["Partition"].strip().lower() == s] for s in ("train", "test")}
    else:
        split_dirs = [d for d in ("train", "val", "test") if (path / d).is_dir()]
        roots = {s: path / s for s in split_dirs} if split_dirs else {"all": path}
        names = sorted({c.name for r in roots.values() for c in r.iterdir() if c.is_dir()})
        if not names:
            raise DataError(f"{path}: no class folders found")
        items = {s: [(f, names.index(c.name)) for c in sorted(r.iterdir()) if c.is_dir() for f in _files(c)]
                 for s, r in roots.items()}
    all_files = [f for v in items.values() for f, _ in v]
    if not all_files:
        raise DataError(f"{path}: no images found")
    in_chans = in_chans or _channels_of(all_files)
    loaded = {s: (_load_images([f for f, _ in v], size, in_chans), torch.tensor([c for _, c in v], dtype=torch.long))
              for s, v in items.items() if v}
    return _complete_splits(loaded, seed, by_class=True), in_chans, names


def _complete_splits(loaded: dict, seed: int, by_class: bool) -> dict:
    """Adds the splits the data does not give (module docstring rules)."""
    if "all" in loaded:
        x, y = loaded.pop("all")
        tr, va, te = _three_way(y.numpy() if by_class else None, len(x), seed)
        return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
    if "val" not in loaded and "train" in loaded:
        x, y = loaded["train"]
        tr, va = _split(y.numpy() if by_class else None, len(x), (0.9, 0.1), seed)
        loaded["train"], loaded["val"] = (x[tr], y[tr]), (x[va], y[va])
    missing = [s for s in ("train", "val", "test") if s not in loaded]
    if missing:
        raise DataError(f"split(s) {missing} are missing and cannot be derived")
    return loaded


def _mask_for(image: Path, masks: dict[str, Path]) -> Path | None:
    for key in (image.stem, f"{image.stem}_anno", f"mask_{image.stem}"):
        if key in masks:
            return masks[key]
    return None


def _pairs_of(root: Path, problems: list[str]) -> list[tuple[Path, Path | None]]:
    """``root/images`` matched with ``root/masks`` (mask names: the module docstring); mismatches are appended to
    ``problems``."""
    if not (root / "masks").is_dir():
        raise DataError(f"{root}: an images/ folder needs a masks/ folder beside it")
    images, masks = _files(root / "images"), {m.stem: m for m in _files(root / "masks")}
    pairs = [(im, _mask_for(im, masks)) for im in images]
    unmatched = [im.name for im, m in pairs if m is None]
    used = {m.stem for _, m in pairs if m is not None}
    orphans = sorted(m.name for k, m in masks.items() if k not in used)
    if unmatched:
        problems.append(f"{root / 'images'}: no mask for {unmatched}")
    if orphans:
        problems.append(f"{root / 'masks'}: no image for {orphans}")
    return pairs


def image_mask_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """The (image, mask) files of a folder with ``images/`` + ``masks/``, in file-name order; raises
    :class:`DataError` listing images without a mask and masks without an image."""
    problems: list[str] = []
    pairs = _pairs_of(Path(root), problems)
    if problems:
        raise DataError("images and masks do not match:\n  " + "\n  ".join(problems))
    return pairs


def _image_mask(path: Path, size: int, in_chans: int | None, seed: int):
    roots = {s: path / s for s in ("train", "val", "test") if (path / s / "images").is_dir()} or {"all": path}
    pairs, problems = {}, []
    for s, root in roots.items():
        pairs[s] = _pairs_of(root, problems)
    if problems:
        raise DataError("images and masks do not match:\n  " + "\n  ".join(problems))
    all_images = [im for v in pairs.values() for im, _ in v]
    if not all_images:
        raise DataError(f"{path}: no images found")
    in_chans = in_chans or _channels_of(all_images)
    loaded, n_classes = {}, 2
    for s, v in pairs.items():
        xs, ys = [], []
        for im, m in v:
            image, mask = read_image(im), mask_to_labels(read_image(m))
            if image.shape[:2] != mask.shape[:2]:
                raise DataError(f"mask {m} is {mask.shape[1]}x{mask.shape[0]}, its image {im} is "
                                f"{image.shape[1]}x{image.shape[0]}")
            xs.append(_resize(_to_tensor(image, in_chans), size))
            ys.append(_resize(torch.from_numpy(mask), size, mask=True))
            n_classes = max(n_classes, int(mask.max()) + 1)
        if xs:
            loaded[s] = (torch.stack(xs), torch.stack(ys))
    names = ["background"] + ([f"class {c}" for c in range(1, n_classes)] if n_classes > 2 else ["foreground"])
    test_names = [im.stem for im, _ in pairs["test"]] if "test" in pairs else None
    return _complete_splits(loaded, seed, by_class=False), in_chans, names, test_names


def load_image_folder(folder: str | Path, size: int, in_chans: int) -> ImageDataset:
    """Every image directly inside ``folder`` (no labels: pretext images), at ``size`` x ``size``; the targets are
    zeros. Raises :class:`DataError` for a folder without images or with unreadable ones."""
    paths = _files(Path(folder))
    if not paths:
        raise DataError(f"{folder}: no {', '.join(sorted(IMAGE_SUFFIXES))} files in it")
    return ImageDataset(_load_images(paths, size, in_chans), torch.zeros(len(paths), dtype=torch.long), "cls", False)


def is_image_folder(folder: str | Path) -> bool:
    """True for a folder that holds images directly (and so no dataset layout with sub-folders)."""
    folder = Path(folder)
    return folder.is_dir() and bool(_files(folder))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling follows ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
