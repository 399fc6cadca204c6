"""One layout of benchmarks/step.py: the real trainer, kept alive, timing training steps on request.

    torchrun --nproc_per_node 2 benchmarks/step_worker.py HOST:PORT NAME --config C --set parallel.ep=2

Builds the Trainer (DeepSpeed engine, EMA, data) once, connects from rank 0 to the benchmark's
listener (authkey in BENCH_AUTHKEY) and says it is ready; then each message is a number of steps
to time (None: stop). The reply holds the window's mean step time and the peak resident memory
(ru_maxrss, the largest over the ranks: this process's lifetime peak). Between windows every rank
waits blocked (rank 0 on the socket, the others in a broadcast), so idle layouts take no CPU from
the one being timed.
"""
import argparse
import os
import time
from multiprocessing.connection import Client

from diffmoe_scale.config import load_config
from diffmoe_scale.parallel.collectives import barrier, broadcast_object, max_over_ranks
from diffmoe_scale.parallel.launcher import exit_process
from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime
from diffmoe_scale.train.trainer import Trainer, peak_memory_mb


def time_steps(trainer: Trainer, steps: int) -> dict:
    barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    step_time = (time.perf_counter() - start) / steps
    device = trainer.runtime.device
    return {"step_time_s": step_time, "peak_memory_mb": max_over_ranks(round(peak_memory_mb(device)), device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address", help="HOST:PORT of the benchmark's listener")
    parser.add_argument("name")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    runtime = init_runtime()
    trainer = Trainer(config, runtime)
    connection = None
    if runtime.is_main:
        host, port = args.address.rsplit(":", 1)
        connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ["BENCH_AUTHKEY"]))
        connection.send({"name": args.name, "world_size": runtime.world_size,
                         "tokens_per_step": config.train.global_batch_size * trainer.tokens_per_image})
    while (steps := broadcast_object(connection.recv() if connection else None)) is not None:
        result = time_steps(trainer, steps)
        if connection:
            connection.send(result)
    shutdown_runtime()
    exit_process(0)


if __name__ == "__main__":
    main()
