"""The split stage's body: the seeded train/validation indices of the training set, as JSON
(readable without Python) and a short hash."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarpipe import atomic
from cifarpipe.config import UserError, load_params
from cifarpipe.data import split


def main(data: Path, out: Path, hash_out: Path, params_path: Path) -> None:
    params = load_params(params_path).split
    try:
        with np.load(data) as z:
            n = len(z["train_labels"])
    except FileNotFoundError:
        raise UserError(f"{data}: not found; run the download stage first") from None
    try:
        s = split.make_split(n, params.val_fraction, params.seed, params.method)
    except ValueError as e:
        raise UserError(f"params.yaml: split.val_fraction: {e}") from None
    text = split.to_json(s)
    atomic.write_text(out, text)
    atomic.write_text(hash_out, split.split_hash(text) + "\n")
    print(f"{out}: {len(s.train)} train / {len(s.val)} validation indices "
          f"(method {params.method}, seed {s.seed}), hash {split.split_hash(text)}")
