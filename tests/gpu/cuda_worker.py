"""Trains on real GPUs with every collective checked as NCCL would: each tensor handed to a c10d op must be a
CUDA tensor (with DIFFMOE_DIST_BACKEND=gloo several ranks can share one GPU; gloo itself would also take CPU
tensors, which NCCL refuses). Object collectives are placed as the NCCL backend places them.

    DIFFMOE_DIST_BACKEND=gloo torchrun --nproc_per_node 2 tests/gpu/cuda_worker.py --config C --set parallel.ep=2 ...
"""
import argparse
import sys
from unittest import mock

import torch
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffmoe_scale.config import load_config
from diffmoe_scale.parallel.launcher import exit_process
from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime


class CollectivesOnCuda(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname not in ("barrier", "monitored_barrier_"):
            tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
            off = [t for t in tensors if not t.is_cuda]
            if off:
                raise RuntimeError(f"{func}: a collective was handed a tensor on {off[0].device}; NCCL takes CUDA "
                                   f"tensors only")
        return func(*args, **(kwargs or {}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    from diffmoe_scale.train.trainer import Trainer

    runtime = init_runtime()
    assert runtime.device.type == "cuda", runtime.device
    with mock.patch.object(c10d, "_get_object_coll_device", lambda group=None: "cuda"), CollectivesOnCuda():
        code = Trainer(config, runtime).train()
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
