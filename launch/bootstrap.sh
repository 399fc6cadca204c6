#!/usr/bin/env bash
# Create the virtual environment .venv in the repository, install requirements.txt into it, then this
# project in editable mode (pip install -e .: the package imports from this tree, from any directory).
# Idempotent: does nothing when .venv was set up from exactly these files (requirements.txt,
# pyproject.toml and this script).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "bootstrap: need Python 3.11 (megatron-core 0.16 and the pinned wheels); $python is $("$python" --version 2>&1)." >&2
    echo "bootstrap: set PYTHON=/path/to/python3.11 and run again." >&2
    exit 1
fi

stamp=.venv/.bootstrap.sha256
wanted=$(sha256sum requirements.txt pyproject.toml launch/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

echo "bootstrap: installing requirements.txt and this project into .venv (a few minutes on a fresh machine)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# setuptools >= 64 builds editable installs (pyproject.toml's build-system; Python 3.11's venv brings 65).
.venv/bin/python -m pip install -q --disable-pip-version-check wheel "setuptools>=64"
# torch first, from its pin: deepspeed then builds against it without build isolation
# (an isolated build would download a multi-GB CUDA torch).
.venv/bin/python -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -r requirements.txt
# The project itself, editable: its dependencies are the requirements above (--no-deps), and an isolated
# build would fetch its own setuptools for nothing.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
# DeepSpeed builds its CPU comm op on first use (about 50 s on 2 cores; nothing on a GPU machine): build it
# now, with this environment's ninja (the one runs will use), so that no first run or test waits for it.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
echo "$wanted" > "$stamp"
echo "bootstrap: .venv ready"
