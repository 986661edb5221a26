"""Datasets and loaders for classification training.

Two sources:

- an ImageFolder/ImageNet layout (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``)
  read by timm's :class:`~timm.data.ImageDataset`, with one class map taken from the
  training split so that train and val agree on the label of every class;
- the embedded default, :class:`DigitsDataset`: scikit-learn's bundled handwritten digits
  (1797 8x8 grey images, 10 classes, shipped inside the scikit-learn wheel, so available
  offline on a fresh machine), upscaled to RGB images, split deterministically per class
  into 1433 training and 364 held-out images.

Augmentation is made a pure function of ``(seed, epoch, sample index)``: every sample is
transformed under RNGs seeded from those three numbers and the global RNG states are
restored afterwards. The images a step sees therefore do not depend on the number of loader
workers, on the process count, or on whether the run was interrupted and resumed, which is
what lets ``--resume`` reproduce an uninterrupted run bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from visionattn.train.config import check_image_folder

__all__ = [
    "DigitsDataset",
    "EpochBatchSampler",
    "SeededTransformDataset",
    "build_datasets",
    "make_loader",
]


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits as an image-classification dataset.

    Args:
        split: ``"train"`` (1433 images) or ``"val"`` (364 images). Every fifth image of each
            class, in dataset order, is held out for ``"val"``; the split never changes.
        size: side in pixels of the RGB images returned (bicubic upscaling of the 8x8 grid).

    Items are ``(PIL.Image RGB size x size, int label)``.
    """

    classes: list[str] = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", size: int = 32) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split: must be 'train' or 'val', got {split!r}")
        if size < 8:
            raise ValueError(f"size: must be >= 8, got {size}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images  # (1797, 8, 8) float, values 0..16
        targets = digits.target.astype(np.int64)
        keep = []
        for c in range(10):
            idx = np.flatnonzero(targets == c)
            held = np.zeros(len(idx), dtype=bool)
            held[::5] = True
            keep.append(idx[held] if split == "val" else idx[~held])
        order = np.sort(np.concatenate(keep))
        grey = np.clip(images[order] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        # upscale once here: the images are tiny, and augmenting an 8x8 grid is meaningless
        self.images = [
            Image.fromarray(g, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            for g in grey
        ]
        self.targets = targets[order].tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.targets[index]


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    # splitmix64 finalizer: a cheap bijective scramble, so nearby keys get unrelated seeds
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends on (seed, epoch, index) only."""
    return _mix64(_mix64(_mix64(seed) ^ epoch) ^ index) & 0xFFFFFFFF


class SeededTransformDataset(Dataset):
    """Wrap a dataset of ``(image, target)`` and apply ``transform`` under per-sample RNGs.

    Keys are ``(index, epoch)`` pairs (as yielded by :class:`EpochBatchSampler`) or plain
    indices (epoch 0). The python, numpy and torch CPU RNGs are seeded from
    ``(seed, epoch, index)`` for the transform; the python and torch states are restored
    afterwards, so the dropout stream is untouched (numpy's is left reseeded).
    """

    def __init__(self, base: Dataset, transform: Any, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        img, target = self.base[index]
        if self.transform is None:
            return img, target
        s = sample_seed(self.seed, epoch, index)
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(s)
        torch.default_generator.manual_seed(s)
        # numpy's global stream is reseeded, not restored: saving its state costs more than
        # the transform itself, and the trainer reseeds it before each use (Mixup)
        np.random.seed(s)
        try:
            img = self.transform(img)
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
        return img, target


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Deterministic, sharded batches of ``(index, augmentation key)`` pairs.

    An epoch visits every sample ``repeats`` times (1 normally); its order is a permutation
    seeded by ``seed + epoch`` (or the identity when ``shuffle`` is false), and process
    ``rank`` of ``world`` takes every ``world``-th entry. The second element of a key,
    ``epoch * repeats + repeat``, keys the sample's augmentation. With ``drop_last`` only full
    batches are kept and their count is rounded down to a multiple of ``multiple_of`` (the
    gradient-accumulation length) so every optimizer step sees the same number of
    micro-batches. :meth:`set_epoch` picks the epoch and how many leading batches to skip
    (resuming mid-epoch without loading the skipped images).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        multiple_of: int = 1,
        repeats: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        if not 0 <= rank < world:
            raise ValueError(f"rank: must be in [0, {world}), got {rank}")
        if repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {repeats}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.drop_last = drop_last
        self.multiple_of = multiple_of
        self.repeats = repeats
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def _num_batches(self) -> int:
        total = self.num_samples * self.repeats
        if self.drop_last:
            n = (total // self.world) // self.batch_size
            return n - n % self.multiple_of
        per_rank = len(range(self.rank, total, self.world))
        return -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return max(self._num_batches() - self.skip, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        total = self.num_samples * self.repeats
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=g).tolist()
        else:
            order = list(range(total))
        mine = order[self.rank :: self.world]
        if self.drop_last:
            mine = mine[: total // self.world]
        n, base = self.num_samples, self.epoch * self.repeats
        for b in range(self.skip, self._num_batches()):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i % n, base + i // n) for i in chunk]


def make_loader(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader over ``sampler``'s batches with its own generator.

    The private generator matters: a DataLoader otherwise draws its worker base seed from the
    global torch RNG each time an epoch starts, which would shift the dropout stream of a
    resumed run.
    """
    g = torch.Generator()
    g.manual_seed(sampler.seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=g,
        # keys carry the epoch, so long-lived workers see the right augmentation
        persistent_workers=workers > 0,
    )


def build_datasets(
    data_dir: str | None,
    train_split: str,
    val_split: str,
    digits_size: int = 32,
) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) from an ImageFolder root, or the embedded digits if None."""
    if data_dir is None:
        return (
            DigitsDataset("train", digits_size),
            DigitsDataset("val", digits_size),
            list(DigitsDataset.classes),
        )
    from timm.data import ImageDataset

    classes = check_image_folder(data_dir, train_split, "data_dir")
    val_classes = check_image_folder(data_dir, val_split, "data_dir")
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise ValueError(
            f"data_dir: the {val_split!r} split has classes absent from {train_split!r}: "
            f"{extra[:10]}"
        )
    class_map = {c: i for i, c in enumerate(classes)}
    train = ImageDataset(f"{data_dir}/{train_split}", class_map=class_map)
    val = ImageDataset(f"{data_dir}/{val_split}", class_map=class_map)
    return train, val, classes


def eval_dataset(data_dir: str | None, split: str, digits_size: int = 32) -> tuple[Dataset, list]:
    """One evaluation split (ImageFolder ``data_dir/split`` or embedded digits) and classes."""
    if data_dir is None:
        if split not in ("train", "val"):
            raise ValueError(f"split: the embedded digits have 'train' and 'val', got {split!r}")
        return DigitsDataset(split, digits_size), list(DigitsDataset.classes)
    from timm.data import ImageDataset

    classes = check_image_folder(data_dir, split, "data_dir")
    return ImageDataset(f"{data_dir}/{split}", class_map={c: i for i, c in enumerate(classes)}), (
        classes
    )


def classes_equal(a: Sequence[str], b: Sequence[str]) -> bool:
    return list(a) == list(b)
