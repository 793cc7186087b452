# Sourced by the product-path scripts on a GPU host (gpu_shard_sweep.sh,
# multi_gpu_check.sh), from the repository root: NCCL without NVLink multicast,
# the carried wheels where the host lacks a package, the checkout on the path,
# and `ws` for the wattsweep command.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import pyarrow" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .wheels-pa/*.whl
python3 -c "import fairscale, submitit, hydra" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .wheels/*.whl
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ws() { python3 -m orchestrator.cli "$@"; }
