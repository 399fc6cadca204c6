"""Latents back to pixels through diffusers' AutoencoderKL (the VAE the latents were extracted with)."""
import torch


def load_vae(name: str, device: torch.device):
    """AutoencoderKL from a local directory (clusters) or a hub name, in eval mode on `device`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name).to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Scaled latents [N, C, h, w] (as training sees them) -> images [N, 3, H, W] in [-1, 1], fp32, decoded
    `batch_size` at a time (the decoder's activations are large at 256 px)."""
    scale = vae.config.scaling_factor
    pieces = [vae.decode((piece / scale).to(vae.dtype)).sample.float().clamp(-1, 1)
              for piece in latents.split(batch_size)]
    return torch.cat(pieces) if pieces else latents.new_zeros(0)
