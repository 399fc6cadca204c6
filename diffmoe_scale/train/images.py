"""Sample grids as PNG files: images, or latents shown channel by channel under a caption."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LATENT_RANGE = 3.0  # latents scaled to about unit variance: shown from -3 (black) to +3 (white)


def grid_canvas(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 [H, W, C] canvas of images [N, C, H, W] in [-1, 1] laid out row-major in `rows` rows."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    count, channels, height, width = images.shape
    cols = -(-count // rows)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, channels), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = image.permute(1, 2, 0).numpy().repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * cell_h : pad + r * cell_h + height * scale, pad + c * cell_w : pad + c * cell_w + width * scale] = tile
    return canvas


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 4, pad: int = 1) -> None:
    """images: [N, C, H, W] in [-1, 1], C in (1, 3), laid out row-major in `rows` rows."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"a grid of images has 1 or 3 channels, not {images.shape[1]}: use save_latent_grid")
    canvas = grid_canvas(images, rows, scale, pad)
    Image.fromarray(canvas.squeeze(-1) if canvas.shape[-1] == 1 else canvas).save(path)


def save_latent_grid(latents: torch.Tensor, rows: int, path: str | Path, caption: str, scale: int = 4) -> None:
    """latents [N, C, h, w] as a grayscale grid: each sample is C tiles side by side (channel 0 first), from
    -LATENT_RANGE (black) to +LATENT_RANGE (white), under `caption` (what the picture is, so nobody takes
    it for decoded images)."""
    count, channels, height, width = latents.shape
    tiles = (latents.float() / LATENT_RANGE).reshape(count * channels, 1, height, width)
    canvas = grid_canvas(tiles, rows, scale).squeeze(-1)
    header = 14  # one line of PIL's default font
    image = Image.new("L", (max(canvas.shape[1], 6 * len(caption) + 4), canvas.shape[0] + header), 255)
    image.paste(Image.fromarray(canvas), (0, header))
    ImageDraw.Draw(image).text((2, 1), caption, fill=0)
    image.save(path)


def grid_classes(num_classes: int, count: int) -> list[int]:
    """`count` classes spread evenly over 0..num_classes-1 (all of them when there are no more)."""
    if count >= num_classes:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / max(count - 1, 1)) for i in range(count)]
