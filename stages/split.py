"""Stage `split`: write the seeded train/validation indices of the training set.

Reads params `split.*`; paths come from dvc.yaml. The body is cifarpipe.pipeline.split.
"""
from pathlib import Path

from cifarpipe.pipeline import split
from cifarpipe.pipeline.stage import run_stage, stage_parser


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hash-out", type=Path, required=True)
    args = ap.parse_args()
    split.main(args.data, args.out, args.hash_out, Path(args.params))


if __name__ == "__main__":
    run_stage(main)
