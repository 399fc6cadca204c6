"""A stand-in rank: installs the stop handlers and ties to its launcher as pretrain_diffmoe.py does, says it is
ready, waits for a stop request and exits with its code through the ranks' exit path."""
import os
import time

from diffmoe_scale.parallel.launcher import tie_to_launcher
from diffmoe_scale.parallel.launcher import exit_process
from diffmoe_scale.train.stop import StopRequest

stop = StopRequest()
tie_to_launcher()
print(f"rank {os.environ['RANK']} ready, pid {os.getpid()}", flush=True)
while not stop.exit_code:
    time.sleep(0.05)
stop.announce()
exit_process(stop.exit_code)
