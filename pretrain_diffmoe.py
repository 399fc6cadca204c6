#!/usr/bin/env python
"""Train a DiffMoE (or dense / token-choice / expert-choice) diffusion transformer.

    python pretrain_diffmoe.py --config configs/digits_diffmoe_e4_flow.yaml [--set train.max_steps=200 ...]
"""
import argparse
import sys

from diffmoe_scale.config import ConfigError, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a DiffMoE diffusion transformer with DeepSpeed (one entry point for every launcher).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python pretrain_diffmoe.py --config configs/digits_diffmoe_e4_flow.yaml "
        "--set train.max_steps=200 --set train.out_dir=runs/try\n\n"
        "exit status: 0 done; 2 bad config or checkpoint that cannot resume; 3 stopped after\n"
        "train.max_nonfinite_steps NaN/Inf steps in a row (saved); 75 stopped by SIGTERM or SIGUSR1 after saving\n"
        "a checkpoint (requeue: the same command resumes); 130 stopped by Ctrl-C after saving",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/ and docs/configuration.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax for the value); repeatable")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", default="auto", metavar="auto|PATH",
                        help="auto (default): continue from the newest intact checkpoint of the run directory if "
                        "there is one; PATH: from that checkpoint (sharded or consolidated) or directory of them")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="none",
                        help="start fresh; existing checkpoints of the run are moved aside, not deleted")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Returns 2 on a bad config; otherwise trains and ends the process with the run's exit code."""
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # Heavy imports only once the config is known to be good.
    from diffmoe_scale.parallel.runtime import exit_process, init_runtime, shutdown_runtime
    from diffmoe_scale.train.trainer import Trainer

    runtime = init_runtime()
    try:
        code = Trainer(config, runtime).train(args.resume)
    except ConfigError as err:  # raised by parts that check the config against what this build has
        print(f"config error: {err}", file=sys.stderr)
        code = 2
    shutdown_runtime()
    exit_process(code)


if __name__ == "__main__":
    sys.exit(main())
