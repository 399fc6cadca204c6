#!/usr/bin/env python
"""Encode an ImageFolder (ImageNet layout: <images>/<class>/<file>) to VAE latents for training.

  python launch/extract_latents.py --images /data/imagenet/train --out data/imagenet256_sdvae_latents
  torchrun --nproc_per_node 8 launch/extract_latents.py ...      (or srun, mpirun: any launcher)

Each image is center-cropped to --image-size as DiT/ADM do, encoded by diffusers' AutoencoderKL
(--vae: a hub name or a local directory; clusters without network use a local copy) and scaled by
its scaling factor; its mirror image is encoded too unless --no-flip (DiT's flip augmentation). The
images are cut into shards of --shard-size, dealt round-robin to the ranks; each shard is written
atomically, so a rerun (after a crash, or SIGUSR1/SIGTERM, which stop after the current shard with
exit status 75) skips the finished ones. index.json and labels.npy come last.
The layout is described in diffmoe_scale/data/latents.py; train with data.dataset=latents.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffmoe_scale.cli import docstring_parser, report_error
from diffmoe_scale.data.extract import encode_shard, list_image_folder
from diffmoe_scale.data.latents import INDEX, LABELS, shard_name


def parse_args(argv=None):
    parser = docstring_parser(__doc__)
    parser.add_argument("--images", required=True, type=Path, help="ImageFolder root: one directory per class")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; reruns resume in it)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="AutoencoderKL: hub name or local dir")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not encode mirror images")
    parser.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                        help="draw from the encoder's distribution (DiT) or take its mean")
    parser.add_argument("--seed", type=int, default=0, help="posterior draws: shard k uses seed * 100003 + k")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def save_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        np.save(file, array)
    tmp.replace(path)


def write_index(args, vae, classes: list[str], images: list, shard_counts: list[int]) -> dict:
    first = np.load(args.out / shard_name(0), mmap_mode="r")
    np.save(args.out / LABELS, np.array([label for _, label in images], dtype=np.int64))
    index = {"format": 1, "num_images": len(images), "latent_shape": list(first.shape[2:]), "flip": args.flip,
             "vae": args.vae, "scale_factor": vae.config.scaling_factor, "image_size": args.image_size,
             "posterior": args.posterior, "seed": args.seed, "classes": classes,
             "shards": [{"file": shard_name(k), "count": n} for k, n in enumerate(shard_counts)]}
    (args.out / (INDEX + ".tmp")).write_text(json.dumps(index, indent=1))
    (args.out / (INDEX + ".tmp")).replace(args.out / INDEX)
    return index


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.images.is_dir():
        report_error(f"error: --images {args.images}: not a directory")
        return 2
    from diffmoe_scale.parallel.launcher import tie_to_launcher
    from diffmoe_scale.train.stop import StopRequest

    stop = StopRequest(unit="shard")  # before any distributed start-up: from here on a stop signal asks for a stop
    tie_to_launcher()
    from diffusers import AutoencoderKL

    from diffmoe_scale.parallel.collectives import broadcast_object, max_over_ranks
    from diffmoe_scale.parallel.launcher import exit_process
    from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime

    runtime = init_runtime()
    classes, images = broadcast_object(list_image_folder(args.images) if runtime.is_main else None)
    if not images:
        report_error(f"error: --images {args.images}: no images in class subdirectories")
        exit_process(2)
    args.out.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(images), args.shard_size))
    mine = [k for k in range(runtime.rank, len(starts), runtime.world_size)]
    todo = [k for k in mine if not (args.out / shard_name(k)).exists()]
    print(f"rank {runtime.rank}: {len(images)} images of {len(classes)} classes in {len(starts)} shards; "
          f"{len(mine) - len(todo)} of my {len(mine)} shards are done already", flush=True)
    vae = AutoencoderKL.from_pretrained(args.vae).to(runtime.device).eval()
    for done, k in enumerate(todo, 1):
        stop.announce()
        if stop.exit_code:
            break
        began = time.perf_counter()
        paths = [path for path, _ in images[starts[k]:starts[k] + args.shard_size]]
        latents = encode_shard(vae, paths, args.image_size, args.flip, args.posterior, args.seed * 100003 + k,
                               args.batch_size, runtime.device)
        save_atomically(args.out / shard_name(k), latents)
        print(f"rank {runtime.rank}: shard {k} ({len(paths)} images, {len(paths) / (time.perf_counter() - began):.1f} "
              f"images/s), {done}/{len(todo)}", flush=True)
    code = max_over_ranks(stop.exit_code, runtime.device)  # the index only once every rank has written all its shards
    if not code and runtime.is_main:
        counts = [min(args.shard_size, len(images) - start) for start in starts]
        index = write_index(args, vae, classes, images, counts)
        print(f"wrote {args.out / INDEX}: {len(images)} images, latents {index['latent_shape']}", flush=True)
    stop.restore()
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
