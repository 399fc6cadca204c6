"""Counts, under pretend CUDA (tests/pretend_cuda.py), what would make the host wait for a GPU in the real
trainer: in one micro-batch's forward and backward, in a whole training step that logs nothing, in one that
logs, and in an inference forward. Writes RESULT (JSON, rank 0): the sites of each ("op at file:line").

    torchrun --nproc_per_node 2 tests/distributed/host_sync_worker.py RESULT --config C --set parallel.ep=2
"""
import argparse
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from diffmoe_scale.config import load_config  # noqa: E402
from diffmoe_scale.parallel.launcher import exit_process  # noqa: E402
from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime  # noqa: E402
from tests.pretend_cuda import pretend_cuda  # noqa: E402


def counted(mode, sites: dict, name: str, function):
    """`function` wrapped to note the syncs of each call in `sites[name]`, a list of lists."""
    def wrapper(*args, **kwargs):
        before = len(mode.sync_sites)
        result = function(*args, **kwargs)
        sites.setdefault(name, []).append(mode.sync_sites[before:])
        return result
    return wrapper


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides + ["logging.every_steps=2", "train.max_steps=2"])
    init_distributed = deepspeed.init_distributed
    gloo = mock.patch.object(deepspeed, "init_distributed",
                             lambda dist_backend=None, **kwargs: init_distributed(dist_backend="gloo", **kwargs))
    sites = {}
    with gloo, pretend_cuda() as mode:
        from diffmoe_scale.train.trainer import Trainer
        from diffmoe_scale.train.watchdog import StallWatchdog

        runtime = init_runtime()
        trainer = Trainer(config, runtime)
        trainer.forward_backward = counted(mode, sites, "forward_backward", trainer.forward_backward)
        trainer.train_step = counted(mode, sites, "step", trainer.train_step)
        trainer.metrics_record = counted(mode, sites, "metrics_record", trainer.metrics_record)
        trainer.prepare_run_dir()
        trainer.watchdog = StallWatchdog(runtime.rank, 600)
        trainer.run_steps()  # step 1 logs nothing, step 2 logs
        trainer.watchdog.close()
        model = trainer.model.eval()
        size, channels, batch = config.model.input_size, config.model.in_channels, 4
        x = torch.randn(batch, channels, size, size, device="cuda")
        t, y = torch.full((batch,), 0.5, device="cuda"), torch.arange(batch, device="cuda")
        for layer in model.moe_layers():
            layer.thresholds.fill_(0.5)
        with torch.no_grad():
            counted(mode, sites, "inference", model)(x.to(trainer.dtype), t, y)
    if runtime.is_main:
        Path(args.result).write_text(json.dumps({"moe_layers": len(model.moe_layers()), **sites}))
    shutdown_runtime()
    exit_process(0)


if __name__ == "__main__":
    main()
