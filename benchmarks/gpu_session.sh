#!/usr/bin/env bash
# Every GPU check and timing of the project in one run, for a session lent a GPU machine
# (which has JAX, Flax, optax and Orbax but no network): install what is missing from
# wheels carried in .whl/ (see docs/decisions.md, "GPU session"), then
#   1. the MoE kernels (Pallas on Triton) against their references, timed (gates at several
#      block heights; grouped matmul in float32 and bfloat16);
#   2. training throughput and MFU of the 125m and 1b (TinyLlama-shaped) decoders, bf16;
#   3. patching-grid cells per second on a SmolLM2-shaped decoder (sweep_cells_per_second.py);
#   4. the kernel and decoder tests on the GPU backend.
# Each step has its own time limit, so one failure or hang does not hide the others.
#   usage: bash benchmarks/gpu_session.sh OUTDIR
# The wheels (made here, where PyPI is reachable; .whl/ is git-ignored via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grain array_record dm-tree ml_collections tensorflow-datasets immutabledict \
#     simple-parsing docstring_parser tensorflow-metadata termcolor toml tensorboardX \
#     portpicker googleapis-common-protos
#   python3 -m pip wheel --no-deps -w .whl promise   # an sdist only
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
# The package layout of pyproject.toml (models/ and train/ become mechinterp.models and
# mechinterp.train), copied rather than built: no build backend is needed there.
rm -rf /tmp/mechinterp && mkdir -p /tmp/mechinterp && cp -r mechinterp /tmp/mechinterp/ \
  && cp -r models /tmp/mechinterp/mechinterp/models \
  && cp -r train /tmp/mechinterp/mechinterp/train || exit 1
export PYTHONPATH=/tmp/mechinterp:/tmp/site
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$out/device.txt"
timeout 120 python3 benchmarks/moe_kernels.py --gate-block-rows 16,64,256,1024 2>&1 \
  | tee "$out/moe_kernels.txt"
timeout 90 python3 benchmarks/moe_kernels.py --kernels gmm --gmm-dtype bfloat16 2>&1 \
  | tee -a "$out/moe_kernels.txt"
timeout 240 python3 benchmarks/train_throughput.py --size 125m --size 1b \
  --json "$out/train_throughput.json" 2>&1 | tee "$out/train_throughput.txt"
timeout 150 python3 benchmarks/sweep_cells_per_second.py 2>&1 | tee "$out/sweep_cells.txt"
timeout 120 python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  tests/test_moe_kernels.py tests/test_moe_router.py 2>&1 | tee "$out/tests.txt"
