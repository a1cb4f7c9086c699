#!/usr/bin/env bash
# bench/gpu_suite.py on a bare GPU machine (the device tool's H200: Python 3.12, torch 2.11 + CUDA 13,
# transformers 5.17, no network). See the suite's docstring.
#
#   here, once:   bash bench/gpu_suite.sh prepare      -> .whl/ (DeepSpeed built without ops, its pydantic and
#                                                          hjson deps, transformers 5.24, the peer), ~20 MB
#   there:        bash bench/gpu_suite.sh [suite args]  -> installs .whl/ into /tmp/site, runs the suite;
#                                                          $OUT/gpu_suite.json and $OUT/gpu_suite.log
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    mkdir -p .whl
    DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 regex==2026.11.19 transformers==5.24.0 -r bench/requirements-peer.txt
    ls -la .whl
    exit 0
fi

out="${OUT:-.}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true
python3 bench/gpu_suite.py --out "$out/gpu_suite.json" "$@" 2>&1 | tee "$out/gpu_suite.log"
