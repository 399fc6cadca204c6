#!/usr/bin/env bash
# Create the virtual environment .venv in the repository and install requirements.txt into it.
# Idempotent: does nothing when .venv already holds exactly these requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "bootstrap: need Python 3.11 (megatron-core 0.16 and the pinned wheels); $python is $("$python" --version 2>&1)." >&2
    echo "bootstrap: set PYTHON=/path/to/python3.11 and run again." >&2
    exit 1
fi

stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

echo "bootstrap: installing requirements.txt into .venv (a few minutes on a fresh machine)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check wheel
# torch first, from its pin: deepspeed then builds against it without build isolation
# (an isolated build would download a multi-GB CUDA torch).
.venv/bin/python -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -r requirements.txt
echo "$wanted" > "$stamp"
echo "bootstrap: .venv ready"
