"""A stand-in for torchrun in launch/supervise.py's tests: starts two ranks (tests/distributed/stand_in_rank.py) in
sessions of their own, as torchrun does, has no handler for SIGUSR1, and exits 1 if any rank fails."""
import os
import subprocess
import sys
from pathlib import Path

rank_script = Path(__file__).with_name("stand_in_rank.py")
ranks = [subprocess.Popen([sys.executable, str(rank_script)], env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"},
                          start_new_session=True) for rank in range(2)]
sys.exit(1 if any(rank.wait() for rank in ranks) else 0)
