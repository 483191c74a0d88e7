#!/usr/bin/env bash
# Installs robustlab into the active Python environment (make and activate a virtual environment first, see the
# README). Used by the README and, with --test, by CI.
#
#   bash scripts/setup.sh            robustlab and its runtime dependencies
#   bash scripts/setup.sh --test     + the test tools, linters, the docs builder and the independent reference
#                                      implementations the tests cross-check against (pyautoattack, torchattacks,
#                                      foolbox: test-only, never imported by robustlab itself)
#   bash scripts/setup.sh --cpu      take PyTorch's CPU-only build (no CUDA packages) when torch must be installed
#   bash scripts/setup.sh --no-compile  leave the bytecode to the first imports (pip otherwise compiles every module
#                                      of every package, most of torch's never imported): about a minute less on 2
#                                      cores; only where Python may write bytecode (PYTHONDONTWRITEBYTECODE unset)
#
# torch: a torch 2.13.0 wheel in /opt/wheels is used when present (offline machines); otherwise the registry's
# torch==2.13.0, which on Linux is the CUDA build (what GPU users want, several GB) unless --cpu is given.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
test_extra=0
cpu_only=0
pip_opts=(-q)
for arg in "$@"; do
  case "$arg" in
    --test) test_extra=1 ;;
    --cpu) cpu_only=1 ;;
    --no-compile)
      if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
        echo "setup.sh: --no-compile with PYTHONDONTWRITEBYTECODE set would leave every import compiling from source; unset it first" >&2
        exit 2
      fi
      pip_opts+=(--no-compile) ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --test, --cpu, --no-compile, --help)" >&2; exit 2 ;;
  esac
done

# torch first, pinned: an unpinned torch, or one pulled in by a dependency, can be a different (CUDA) build.
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.13.0*.whl 2>/dev/null | head -n1 || true)
  echo "setup: installing torch 2.13.0${wheel:+ from $wheel} (a minute or more)"
  if [ -n "$wheel" ]; then
    pip install "${pip_opts[@]}" "$wheel"
  elif [ "$cpu_only" = 1 ]; then
    pip install "${pip_opts[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    pip install "${pip_opts[@]}" torch==2.13.0
  fi
fi

if [ "$test_extra" = 1 ]; then
  echo "setup: installing robustlab with the test tools, linters and docs builder (about a minute)"
  pip install "${pip_opts[@]}" -e ".[test]"
  echo "setup: installing the reference implementations the tests cross-check against"
  # Test-only reference implementations; --no-deps keeps torchvision (and a second torch) out.
  pip install "${pip_opts[@]}" --no-deps torchattacks==3.5.1 pyautoattack==0.2.0 \
      foolbox==3.3.4 eagerpy==0.30.0 GitPython==3.1.45 gitdb==4.0.12 smmap==5.0.2 \
      numba==0.68.1 llvmlite==0.50.0  # numba: foolbox's Brendel-Bethge solvers
else
  echo "setup: installing robustlab and its dependencies (about a minute)"
  pip install "${pip_opts[@]}" -e .
fi
echo "setup: done ($(python -c 'import robustlab; print("robustlab", robustlab.__version__)'))"
