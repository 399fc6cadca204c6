#!/usr/bin/env python
"""Score generated images in ADM's .npz layout (arr_0: uint8 [N, H, W, C], arr_1: class labels).

  python launch/evaluate.py samples.npz --digits                       # digit FID and accuracy
  python launch/evaluate.py samples.npz --inception inception-2015-12-05.pt --reference VIRTUAL_imagenet256_labeled.npz
  python launch/evaluate.py real.npz --inception inception-2015-12-05.pt --write-reference ref.npz

--inception takes a local TorchScript Inception network with the interface of StyleGAN3's
inception-2015-12-05.pt (clusters have no network: copy it next to the data); --reference takes
statistics with arrays mu and sigma (ADM's reference batches have them). Prints one readable line
and one JSON line.
"""
import json
import sys
from pathlib import Path

import numpy as np

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.eval.evaluators import DigitsEvaluator, InceptionEvaluator
from diffmoe_scale.eval.fid import feature_statistics, save_statistics


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as data:
        return data["arr_0"], (data["arr_1"] if "arr_1" in data else None)


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("samples", type=Path, help=".npz with arr_0 (uint8 NHWC images) and arr_1 (labels)")
    parser.add_argument("--digits", action="store_true", help="digit FID and class accuracy (8x8 digits)")
    parser.add_argument("--inception", type=Path, help="TorchScript Inception network (FID, IS)")
    parser.add_argument("--reference", type=Path, help="reference statistics .npz (mu, sigma) for FID")
    parser.add_argument("--write-reference", type=Path, metavar="OUT", help="write the samples' statistics instead")
    args = parser.parse_args(argv)
    images, labels = read_samples(args.samples)
    if args.write_reference:
        if not args.inception:
            parser.error("--write-reference needs --inception")
        features = InceptionEvaluator(args.inception).features(images)
        save_statistics(args.write_reference, *feature_statistics(features))
        print(f"wrote the statistics of {len(images)} images to {args.write_reference}")
        return 0
    if args.digits == bool(args.inception):
        parser.error("give --digits, or --inception with --reference")
    if args.digits:
        if labels is None:
            parser.error(f"{args.samples}: --digits needs the labels (arr_1)")
        scores = DigitsEvaluator()(images, labels)
    else:
        if not args.reference:
            parser.error("--inception needs --reference (or --write-reference)")
        scores = InceptionEvaluator(args.inception, args.reference)(images, labels)
    print(f"{args.samples}: {len(images)} images; " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(json.dumps({"samples": str(args.samples), "num_images": len(images), **scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
