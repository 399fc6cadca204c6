"""What FID sampling holds and writes (launch/sample.py's layout): a rank's rows of one token pool in memory,
its shard per pool on disk, and rank 0's merge, which holds one shard at a time."""
import math

from ..config import Config

VAE_DOWNSAMPLING = 8  # the SD VAE: 256 px images <-> 32x32 latents
MERGE_PEAK_SHARDS = 4.4  # measured: np.load of a zip member holds ~3.3 copies of its array, plus the one written


def sampling_estimate(config: Config, world_size: int, num_samples: int = 50000, batch_size: int = 256) -> dict:
    """Bytes of a sampling run of `num_samples` with `batch_size` samples per token pool on `world_size` ranks
    in EP groups of parallel.ep (tensor parallel 1)."""
    model = config.model
    latents = config.data.dataset == "latents"
    side = model.input_size * (VAE_DOWNSAMPLING if latents else 1)
    channels = 3 if latents else model.in_channels
    rows = batch_size // config.parallel.ep
    shard = rows * side * side * channels
    groups = world_size // config.parallel.ep
    pools = math.ceil(num_samples / batch_size)
    return {"image_side": side, "rows_per_rank": rows, "shard_bytes": shard,
            "latent_bytes_per_rank": rows * model.in_channels * model.input_size ** 2 * 4,
            "npz_bytes": num_samples * side * side * channels, "merge_peak_bytes": MERGE_PEAK_SHARDS * shard,
            "pools": pools, "rounds": math.ceil(pools / groups), "shards": pools * config.parallel.ep}
