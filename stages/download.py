"""Stage `download`: fetch and verify the CIFAR-10 archive, write the uint8 arrays.

Reads params `data.*`; paths come from dvc.yaml. The body is cifarpipe.pipeline.download.
"""
from pathlib import Path

from cifarpipe.pipeline import download
from cifarpipe.pipeline.stage import run_stage, stage_parser


def main() -> None:
    ap = stage_parser(__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    download.main(args.archive, args.out, Path(args.params))


if __name__ == "__main__":
    run_stage(main)
