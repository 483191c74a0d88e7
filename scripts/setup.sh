#!/usr/bin/env bash
# Installs robustlab and its test dependencies on a fresh machine (used by the README and by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: an unpinned torch pulls several GB of CUDA packages. Use the local CPU wheel when
# the machine has one, else the registry's build of the same version.
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.13.0*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then pip install -q "$wheel"; else pip install -q torch==2.13.0; fi
fi
pip install -q -e ".[test]"
# Test-only reference implementations (never runtime dependencies); --no-deps keeps torchvision out.
pip install -q --no-deps torchattacks==3.5.1 pyautoattack==0.2.0 \
    foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.1.45 gitdb==4.0.12 smmap==5.0.2
