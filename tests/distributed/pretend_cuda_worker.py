"""Trains under pretend CUDA (tests/pretend_cuda.py): the real launcher-facing start-up, trainer, DeepSpeed
engine, checkpoints and end-of-run samples, every op and collective checked as a GPU and NCCL would. Writes RESULT (JSON, rank 0): the exit code, the device
the runtime chose, the host syncs counted and the dtypes each kind of collective carried.

    torchrun --nproc_per_node 2 tests/distributed/pretend_cuda_worker.py RESULT --config C --set parallel.ep=2 ...
"""
import argparse
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402

from diffmoe_scale.config import load_config  # noqa: E402
from diffmoe_scale.parallel.launcher import exit_process  # noqa: E402
from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime  # noqa: E402
from tests.pretend_cuda import pretend_cuda  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", default="auto")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    init_distributed = deepspeed.init_distributed
    # NCCL needs GPUs: the collectives run over gloo on the hosts, checked for CUDA tensors by the mode.
    gloo = mock.patch.object(deepspeed, "init_distributed",
                             lambda dist_backend=None, **kwargs: init_distributed(dist_backend="gloo", **kwargs))
    with gloo, pretend_cuda() as mode:
        from diffmoe_scale.train.trainer import Trainer

        runtime = init_runtime()
        code = Trainer(config, runtime).train(args.resume)
    if runtime.is_main:
        collective_dtypes = {name: sorted(dtypes) for name, dtypes in mode.collective_dtypes.items()}
        Path(args.result).write_text(json.dumps({"exit_code": code, "device": str(runtime.device),
                                                 "host_syncs": mode.host_syncs,
                                                 "collective_dtypes": collective_dtypes}))
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    main()
