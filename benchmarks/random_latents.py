#!/usr/bin/env python
"""Random latents in the format launch/extract_latents.py writes, for timing training without a dataset.

  python benchmarks/random_latents.py OUT_DIR [--images 1024] [--shape 4 32 32] [--classes 1000]

Speed does not depend on the values: this lets benchmarks/gpu.sh time the ImageNet configs' steps.
"""
import json
import sys
from pathlib import Path

import numpy as np

from diffmoe_scale.cli import docstring_parser
from diffmoe_scale.data.latents import INDEX, LABELS, shard_name


def write(out: Path, images: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(out / shard_name(0), rng.standard_normal((images, 1, *shape), dtype=np.float32).astype(np.float16))
    np.save(out / LABELS, rng.integers(0, classes, images, dtype=np.int64))
    index = {"num_images": images, "latent_shape": list(shape), "flip": False, "classes": [str(c) for c in range(classes)],
             "shards": [{"file": shard_name(0), "count": images}], "vae": "random", "scale_factor": 1.0}
    (out / INDEX).write_text(json.dumps(index))


def main(argv=None) -> int:
    parser = docstring_parser(__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 32, 32))
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    write(args.out, args.images, tuple(args.shape), args.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
