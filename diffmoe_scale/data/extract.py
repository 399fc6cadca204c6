"""Images to VAE latents: the ImageFolder listing, DiT/ADM's center crop, and the encoding of one shard."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) of an ImageNet-style folder <root>/<class>/<image>,
    classes and images in sorted order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images = [(path, label) for label, name in enumerate(classes)
              for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    return classes, images


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's crop, as DiT uses it: halve with a box filter while the short side is at least 2x `size`,
    resize the short side to `size` (bicubic), then cut the central square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]."""
    with Image.open(path) as image:
        pixels = np.asarray(center_crop(image.convert("RGB"), size), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_shard(vae, paths: list[Path], size: int, flip: bool, posterior: str, seed: int, batch_size: int,
                 device: torch.device) -> np.ndarray:
    """float16 [len(paths), 1 or 2, C, h, w]: scaled latents of each image (and of its mirror image).
    `posterior`: "sample" draws from the encoder's distribution with a generator seeded by `seed`
    (as DiT's extraction does), "mean" takes its mean."""
    generator = torch.Generator(device=device).manual_seed(seed)
    scale = vae.config.scaling_factor
    latents = []
    for start in range(0, len(paths), batch_size):
        images = torch.stack([load_image(p, size) for p in paths[start:start + batch_size]]).to(device, vae.dtype)
        views = [images, images.flip(-1)] if flip else [images]
        encoded = []
        for view in views:
            distribution = vae.encode(view).latent_dist
            latent = distribution.sample(generator) if posterior == "sample" else distribution.mean
            encoded.append(latent * scale)
        latents.append(torch.stack(encoded, dim=1).float().cpu())
    return torch.cat(latents).numpy().astype(np.float16)
