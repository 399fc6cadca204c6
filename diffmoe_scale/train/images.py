"""Sample grids as PNG files."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 4, pad: int = 1) -> None:
    """images: [N, C, H, W] in [-1, 1], C in (1, 3), laid out row-major in `rows` rows."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    count, channels, height, width = images.shape
    cols = -(-count // rows)
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, channels), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        tile = image.permute(1, 2, 0).numpy().repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * cell_h : pad + r * cell_h + height * scale, pad + c * cell_w : pad + c * cell_w + width * scale] = tile
    Image.fromarray(canvas.squeeze(-1) if channels == 1 else canvas).save(path)
