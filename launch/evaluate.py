#!/usr/bin/env python
"""Score generated images in ADM's .npz layout (arr_0: uint8 [N, H, W, C], arr_1: class labels).

  python launch/evaluate.py samples.npz --digits                       # digit FID and accuracy
  python launch/evaluate.py samples.npz --inception inception-2015-12-05.pt --reference VIRTUAL_imagenet256_labeled.npz
  python launch/evaluate.py real.npz --inception inception-2015-12-05.pt --write-reference ref.npz

--inception takes a local TorchScript Inception network with the interface of StyleGAN3's
inception-2015-12-05.pt (clusters have no network: copy it next to the data); --reference takes
statistics with arrays mu and sigma (ADM's reference batches have them). Prints one readable line
and one JSON line. --digits takes 8x8 grayscale images (uint8 [N, 8, 8, 1], as launch/sample.py writes
for the digits config) with labels 0..9; --inception takes RGB images (uint8 [N, H, W, 3]). An input
that cannot be scored ends with one line naming the file and the problem, and exit status 2.
"""
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.eval.evaluators import DigitsEvaluator, InceptionEvaluator, images_problem
from diffmoe_scale.eval.fid import feature_statistics, load_statistics, save_statistics

UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)  # what numpy raises for a damaged file


class BadInput(Exception):
    """An input that cannot be scored; the message names the file and the problem."""


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except UNREADABLE as err:  # numpy takes any other file for a pickle, which it does not load
        raise BadInput(f"{path}: not a readable .npz file ({'not an array archive' if 'pickle' in str(err) else err})"
                       ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadInput(f"{path}: one array, not an .npz with arr_0 (images) and arr_1 (labels)")
    with data:
        if "arr_0" not in data:
            raise BadInput(f"{path}: no arr_0 (the images); it holds {sorted(data)}")
        try:
            return data["arr_0"], (data["arr_1"] if "arr_1" in data else None)
        except UNREADABLE as err:
            raise BadInput(f"{path}: an array is unreadable ({err})") from None


def check_samples(path: Path, images: np.ndarray, labels: np.ndarray | None, evaluator_class, needs_labels: bool):
    problem = images_problem(images, evaluator_class.CHANNELS, evaluator_class.SIZE)
    if problem:
        raise BadInput(f"{path}: {problem}")
    if not needs_labels:
        return
    if labels is None:
        raise BadInput(f"{path}: no arr_1 (the class labels); --digits needs them")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"{path}: arr_1 holds {labels.dtype} of shape {list(labels.shape)}; --digits needs one integer "
                       f"label per image ([{len(images)}])")
    if len(labels) and not 0 <= labels.min() <= labels.max() <= 9:
        raise BadInput(f"{path}: arr_1 holds labels {labels.min()}..{labels.max()}; digits are 0..9")


def inception_evaluator(network: Path, reference: Path | None) -> InceptionEvaluator:
    if reference is not None:
        try:
            load_statistics(reference)
        except (KeyError, *UNREADABLE) as err:
            raise BadInput(f"--reference {reference}: not reference statistics ({err})") from None
    try:
        return InceptionEvaluator(network, reference)
    except (RuntimeError, *UNREADABLE) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"--inception {network}: not a TorchScript network file ({first_line})") from None


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("samples", type=Path, help=".npz with arr_0 (uint8 NHWC images) and arr_1 (labels)")
    parser.add_argument("--digits", action="store_true", help="digit FID and class accuracy (8x8 grayscale digits)")
    parser.add_argument("--inception", type=Path, help="TorchScript Inception network (FID, IS; RGB images)")
    parser.add_argument("--reference", type=Path, help="reference statistics .npz (mu, sigma) for FID")
    parser.add_argument("--write-reference", type=Path, metavar="OUT", help="write the samples' statistics instead")
    args = parser.parse_args(argv)
    if args.write_reference and not args.inception:
        parser.error("--write-reference needs --inception")
    if not args.write_reference and args.digits == bool(args.inception):
        parser.error("give --digits, or --inception with --reference")
    if args.inception and not args.write_reference and not args.reference:
        parser.error("--inception needs --reference (or --write-reference)")
    try:
        images, labels = read_samples(args.samples)
        evaluator_class = DigitsEvaluator if args.digits and not args.write_reference else InceptionEvaluator
        check_samples(args.samples, images, labels, evaluator_class, needs_labels=evaluator_class is DigitsEvaluator)
        evaluator = (DigitsEvaluator() if evaluator_class is DigitsEvaluator else
                     inception_evaluator(args.inception, None if args.write_reference else args.reference))
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.write_reference:
        save_statistics(args.write_reference, *feature_statistics(evaluator.features(images)))
        print(f"wrote the statistics of {len(images)} images to {args.write_reference}")
        return 0
    scores = evaluator(images, labels)
    print(f"{args.samples}: {len(images)} images; " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(json.dumps({"samples": str(args.samples), "num_images": len(images), **scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
