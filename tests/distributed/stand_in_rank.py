"""A stand-in rank: installs the stop handlers and ties to its launcher as pretrain_diffmoe.py does, says it is
ready, waits for a stop request and exits with its code through the ranks' exit path."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffmoe_scale.parallel.launcher import tie_to_launcher  # noqa: E402
from diffmoe_scale.parallel.runtime import exit_process  # noqa: E402
from diffmoe_scale.train.stop import StopRequest  # noqa: E402

stop = StopRequest()
tie_to_launcher()
print(f"rank {os.environ['RANK']} ready, pid {os.getpid()}", flush=True)
while not stop.exit_code:
    time.sleep(0.05)
stop.announce()
exit_process(stop.exit_code)
