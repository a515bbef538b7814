"""The seeded train/validation split of the 50,000 training images.

Machine- and version-independent by construction: each index i gets the key
sha256(f"{seed}:{i}"), indices are ordered by key, and the first round(n * val_fraction)
become the validation set. Only hashlib and sorting are involved, so no RNG implementation
(numpy's, torch's) can change the split between machines or library versions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    seed: int
    val_fraction: float
    train: list[int]  # sorted ascending
    val: list[int]

    @property
    def n(self) -> int:
        return len(self.train) + len(self.val)


def make_split(n: int, val_fraction: float, seed: int) -> Split:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} images leaves an empty train or validation set")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return Split(seed, val_fraction, train=sorted(order[n_val:]), val=sorted(order[:n_val]))


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
