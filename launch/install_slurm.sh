#!/usr/bin/env bash
# Install the Slurm daemons, clients and munge from the Debian archive, for the local
# test cluster in tests/slurm_cluster.py. Idempotent: does nothing when they are on PATH.
set -euo pipefail

# The daemons live in /usr/sbin, which the PATH of a non-login shell may lack.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for binary in sbatch slurmctld slurmd munged; do
    command -v "$binary" >/dev/null || missing+=("$binary")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$EUID" -ne 0 ]; then
    echo "install_slurm: missing ${missing[*]}; run this script as root (it uses apt-get)." >&2
    exit 1
fi

echo "install_slurm: installing slurm-wlm and munge (missing: ${missing[*]})"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "install_slurm: done"
