#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py: what it measures and prints), in one command, on a
# machine whose Python has JAX and/or PyTorch but no TensorFlow, and no network. What
# Keras needs beyond them comes as wheels in .whl/ (`make gpu-wheels`, where pip works):
# installed here into a temporary folder, when this Python lacks Keras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3
fi
if ! "$python" -c "import keras" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: $python has no Keras and .whl/ holds no wheels: run 'make gpu-wheels' where pip works, and bring .whl/ along." >&2
        exit 2
    fi
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    if ! "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
        echo "gpu_check: cannot install .whl/ into $python; make gpu-wheels makes them for Python 3.12 on x86-64 (GPU_PYTHON=3.11 make gpu-wheels for another)." >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" bench/gpu_check.py "$@"
