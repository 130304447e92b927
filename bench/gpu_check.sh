#!/usr/bin/env bash
# Everything a GPU should check, in one command of at most 8 minutes, with only a preinstalled torch:
#   bash bench/gpu_check.sh [OUT]          versions and nvidia-smi, the cuSOLVER binding's selftest at the real
#                                          shapes, a host-sync check of each solver route, the CUDA tests, bench_ses
#                                          (ResNet-18 / ResNet-50, each in bf16 and fp16; ResNet-18 bf16 also under
#                                          --compile inductor), a one-process torchrun smoke and NCCL collectives,
#                                          exp11 / exp12 --preflight
#   bash bench/gpu_check.sh --cpu [OUT]    the same parts on a CPU with tiny sizes (CUDA-only parts skipped)
#   bash bench/gpu_check.sh --only PART,... [OUT]   only those parts (env always runs)
# Writes OUT/gpu_check.json and OUT/gpu_check.txt (default OUT: ./gpu_check_out); see bench/gpu_check.py.
# Exit code: 0 every part ran or was skipped for a reason, 1 a part failed or timed out, 2 no torch, a failed
# env part, or no CUDA in GPU mode. PYTHON picks the interpreter (default: python3, else python).
set -u
py=${PYTHON:-$(command -v python3 || command -v python)}
if [ -z "$py" ]; then echo "gpu_check.sh: no python3 or python on PATH; set PYTHON=/path/to/python" >&2; exit 2; fi
exec "$py" "$(dirname "$0")/gpu_check.py" "$@"
