#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine (about 8 minutes on an H100):
#   1. the engine's CUDA tests: the Triton decode kernel compiled and checked against the
#      reference attention, CUDA graphs captured and replayed, the grammar bitmask applied
#      on the device, the quantized linears' CUDA kernels;
#   2. the llama3-8b shape (random weights) in bfloat16 and int4, 256 rows: the engine,
#      the engine without CUDA graphs, Hugging Face's continuous batching and naive
#      generate, with each system's share of the HBM roofline (scripts/bench.py).
#
#   OUT=/tmp/gpu-check scripts/gpu_check.sh      # device.txt, tests.txt, bench.json there
#
# The machine needs torch with CUDA, transformers, pyarrow and pytest (a usual CUDA image
# has them). Packages it lacks (llguidance, ...) can travel as wheels in .gpu-wheels/
# (`pip download --no-deps -d .gpu-wheels llguidance`): they are installed beside the
# tree, not into the image.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target .gpu-site .gpu-wheels/*.whl
    export PYTHONPATH="$PWD/.gpu-site:$PYTHONPATH"
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device visible to $PYTHON" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"

# -rs lists what was skipped: on a GPU machine no CUDA test may be among them.
timeout 200 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    tests/engine/test_engine_cuda_graphs.py tests/engine/test_engine_attention.py \
    tests/engine/test_engine_structured.py tests/quant/test_quant_linear.py \
    2>&1 | tee "$OUT/tests.txt"

timeout 330 "$PYTHON" scripts/bench.py --random-model llama3-8b --device cuda --rows 256 \
    --quant bfloat16,int4 --systems engine,engine-eager,hf-cb,naive --out "$OUT/bench.json"
"$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(json.dumps({k: d[k] for k in ('machine', 'systems', 'quant', 'roofline') if k in d}, indent=1))" \
    "$OUT/bench.json" | head -120
