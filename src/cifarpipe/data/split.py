"""The seeded train/validation split of the 50,000 training images, by one of two methods.

- ``course`` (the default): exactly the course's
  ``torch.utils.data.random_split(train_data, (0.85, 0.15), generator=torch.Generator().manual_seed(2025))``
  for ``split.val_fraction`` 0.15 and ``split.seed`` 2025; in general the call with fractions
  ``(1 - val_fraction, val_fraction)`` and the seed. Reimplemented here (same length rule, same
  ``torch.randperm`` with the same generator), so the stage needs no Dataset; tests prove parity
  against torch's own function. It depends on torch's CPU ``randperm``: a test pins its hash, so a
  torch release that changed it would be noticed, not silently give another validation set.
- ``hash``: each index i gets the key sha256(f"{seed}:{i}"), indices are ordered by key, and the
  first round(n * val_fraction) become the validation set. Only hashlib and sorting are involved,
  so no RNG implementation (numpy's, torch's) can change it between machines or library versions.

Both lists are stored in ascending order, whatever the method: random_split's Subsets hold their
indices in permutation order, but the split file has always been sorted and what it means (which
image is in which part) does not depend on the order; `course_parts` gives the Subsets' order.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

SplitMethod = Literal["course", "hash"]


@dataclass(frozen=True)
class Split:
    seed: int
    val_fraction: float
    train: list[int]  # sorted ascending
    val: list[int]  # sorted ascending

    @property
    def n(self) -> int:
        return len(self.train) + len(self.val)


def course_parts(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The ``.indices`` of the (train, validation) Subsets, in their order, that
    ``random_split(range(n), (1 - val_fraction, val_fraction), generator=torch.Generator().manual_seed(seed))``
    returns (torch/utils/data/dataset.py)."""
    import torch  # here, not at import time: the hash method and from_json need no torch

    fractions = (1 - val_fraction, val_fraction)
    # random_split's rule for fractions: floor(n * f) each, then the remainder one by one,
    # round-robin from the first part (so train gets the first extra index). It takes this branch
    # only when the fractions sum to ~1 and not above; (1 - f) + f does for every float f in (0, 1),
    # but say so rather than diverge from torch if that ever failed.
    if not (math.isclose(sum(fractions), 1) and sum(fractions) <= 1):
        raise ValueError(f"fractions {fractions} do not sum to 1")
    lengths = [math.floor(n * f) for f in fractions]
    for i in range(n - sum(lengths)):
        lengths[i % len(lengths)] += 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:lengths[0]], order[lengths[0]:]


def _hash_parts(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_val = round(n * val_fraction)
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return order[n_val:], order[:n_val]


def make_split(n: int, val_fraction: float, seed: int, method: SplitMethod) -> Split:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if method == "course":
        train, val = course_parts(n, val_fraction, seed)
    elif method == "hash":
        train, val = _hash_parts(n, val_fraction, seed)
    else:
        raise ValueError(f"unknown split method {method!r}: use 'course' or 'hash'")
    if not train or not val:
        raise ValueError(f"val_fraction={val_fraction} of {n} images leaves an empty train or validation set")
    return Split(seed, val_fraction, train=sorted(train), val=sorted(val))


def to_json(split: Split) -> str:
    """Canonical text (fixed key order, no spaces) so equal splits give equal bytes and hashes."""
    return json.dumps({"seed": split.seed, "val_fraction": split.val_fraction, "n": split.n,
                       "train": split.train, "val": split.val}, separators=(",", ":")) + "\n"


def from_json(text: str) -> Split:
    d = json.loads(text)
    s = Split(int(d["seed"]), float(d["val_fraction"]), list(d["train"]), list(d["val"]))
    if sorted(s.train + s.val) != list(range(d["n"])):
        raise ValueError("split file is inconsistent: every index must be in exactly one of train/val")
    return s


def split_hash(text: str) -> str:
    """Short content hash (first 16 hex digits of SHA-256) logged with every run."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
