#!/usr/bin/env python
"""Train a DiffMoE (or dense / token-choice / expert-choice) diffusion transformer.

    python pretrain_diffmoe.py --config configs/digits_diffmoe_e4_flow.yaml [--set train.max_steps=200 ...]
"""
import argparse
import sys
from pathlib import Path

from diffmoe_scale.cli import report_error
from diffmoe_scale.config import ConfigError, load_config
from diffmoe_scale.parallel.launcher import report_exit_status, tie_to_launcher
from diffmoe_scale.train.resume_policy import check_allowable
from diffmoe_scale.train.stop import StopRequest


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a DiffMoE diffusion transformer with DeepSpeed (one entry point for every launcher).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python pretrain_diffmoe.py --config configs/digits_diffmoe_e4_flow.yaml "
        "--set train.max_steps=200 --set train.out_dir=runs/try\n\n"
        "exit status: 0 done; 2 bad config, checkpoints that cannot resume, or a run directory that another\n"
        "live run holds (its lock <out_dir>/run.lock names it); 3 stopped after train.max_nonfinite_steps\n"
        "NaN/Inf steps in a row (saved); 4 a checkpoint could not be written (no room on its file system, or\n"
        "an I/O error; the message names the path and the space; not to be requeued: free space, then the same\n"
        "command resumes); 5 a collective timed out or lost a peer (parallel.timeout_minutes: another rank\n"
        "stalled or died); 75 stopped by SIGTERM or SIGUSR1 after saving a checkpoint (requeue: the same command\n"
        "resumes); 130 stopped by Ctrl-C after saving.\n"
        "torchrun and mpirun report 1 for any of these: run them under launch/supervise.py to get the ranks' status",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/ and docs/configuration.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax for the value); repeatable")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", default="auto", metavar="auto|PATH",
                        help="auto (default): continue from the newest intact checkpoint of the run directory if "
                        "there is one; PATH: from that checkpoint (sharded or consolidated) or directory of them; "
                        "a PATH outside this run's checkpoint directory starts a new run (new run and W&B id) that "
                        "records its source run")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="none",
                        help="start fresh; the run's existing checkpoints and metrics.jsonl are moved aside, not "
                        "deleted")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="resume although KEY, a setting of the training maths (e.g. moe.capacity, train.seed; "
                        "pool_tokens: the tokens per training pool that the parallel layout sets; dataset_size), "
                        "differs from the checkpoint's; such a change is refused otherwise (exit 2). Repeatable; "
                        "the classes of keys are in docs/long-runs.md")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Returns 2 on a bad config; otherwise trains and ends the process with the run's exit code."""
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_allowable(args.allow_change)
    except ConfigError as err:
        report_error(f"config error: {err}")
        report_exit_status(2)
        return 2
    stop = StopRequest()  # before any distributed start-up: from here on a stop signal asks for a save
    tie_to_launcher()
    # Heavy imports only once the config is known to be good.
    from diffmoe_scale.parallel.launcher import exit_process
    from diffmoe_scale.parallel.runtime import init_runtime, shutdown_runtime
    from diffmoe_scale.parallel.timeouts import EXIT_COLLECTIVE_FAILED, describe_collective_failure
    from diffmoe_scale.train.disk_space import SaveFailed
    from diffmoe_scale.train.run_lock import RunLockError, run_directory_lock
    from diffmoe_scale.train.trainer import EXIT_SAVE_FAILED, Trainer

    runtime = init_runtime()
    trainer = None
    try:
        with run_directory_lock(Path(config.train.out_dir), runtime.is_main):
            trainer = Trainer(config, runtime, stop)
            code = trainer.train(args.resume, tuple(args.allow_change))
    except ConfigError as err:  # raised by parts that check the config against what this build has
        report_error(f"config error: {err}", ranks_leave_together=True)
        code = 2
    except RunLockError as err:  # raised on every rank
        if runtime.is_main:
            print(f"error: {err}", file=sys.stderr)
        code = 2
    except SaveFailed as err:
        if runtime.is_main or not err.collective:
            print(f"error: {err}", file=sys.stderr)
        if not err.collective:  # the other ranks may wait inside the save: no shutdown barrier; the launcher ends them
            exit_process(EXIT_SAVE_FAILED)
        code = EXIT_SAVE_FAILED
    except RuntimeError as err:
        failure = describe_collective_failure(err, config.parallel.timeout_minutes)
        if failure is None:
            raise
        where = f"at step {trainer.step}" if trainer else "while starting"
        print(f"rank {runtime.rank}: {failure} {where}; another rank stalled or died", file=sys.stderr, flush=True)
        exit_process(EXIT_COLLECTIVE_FAILED)  # without the shutdown barrier: a peer is gone
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
