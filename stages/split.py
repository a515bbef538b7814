"""Stage `split`: write the seeded train/validation indices of the training set.

Reads params `split.*`; writes the indices as JSON (readable without Python) and a short hash.
"""
from pathlib import Path

import numpy as np

from cifarpipe import atomic, split
from cifarpipe.cli import run_stage, stage_parser
from cifarpipe.config import UserError, load_params


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hash-out", type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params).split
    try:
        with np.load(args.data) as z:
            n = len(z["train_labels"])
    except FileNotFoundError:
        raise UserError(f"{args.data}: not found; run the download stage first") from None
    try:
        s = split.make_split(n, params.val_fraction, params.seed, params.method)
    except ValueError as e:
        raise UserError(f"params.yaml: split.val_fraction: {e}") from None
    text = split.to_json(s)
    atomic.write_text(args.out, text)
    atomic.write_text(args.hash_out, split.split_hash(text) + "\n")
    print(f"{args.out}: {len(s.train)} train / {len(s.val)} validation indices "
          f"(method {params.method}, seed {s.seed}), hash {split.split_hash(text)}")


if __name__ == "__main__":
    run_stage(main)
