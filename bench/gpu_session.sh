#!/usr/bin/env bash
# What a lent GPU should check, in parts that each fit a 10-minute call (run from the repo root):
#   bash bench/gpu_session.sh checks OUT   # versions, the batched cuSOLVER selftest, the CUDA tests,
#                                          # a one-process torchrun (NCCL, SyncBatchNorm) and --tensorboard smoke
#   bash bench/gpu_session.sh bf16 OUT     # bench_ses: every solver route, steps, --compile, --profile
#   bash bench/gpu_session.sh fp16 OUT     # the same under fp16 + GradScaler (the T4's path)
# Writes its logs and JSON under OUT (default ./gpu_out).
set -u
part=${1:?usage: bash bench/gpu_session.sh checks|bf16|fp16 [OUT]}
out=${2:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "$part" in
  checks)
    nvidia-smi | tee "$out/nvidia-smi.txt"
    python -c "import torch, cusolver_batched as c; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name(), '|', c.find_library(), \
'XsyevBatched' if c.has_xsyev_batched() else 'syevjBatched only')" | tee "$out/versions.txt"
    python cusolver_batched.py --selftest cuda:0 2>&1 | tail -3 | tee "$out/selftest.txt"
    python -m pytest -q -p no:cacheprovider tests/test_ses_solvers.py tests/test_ses_core.py tests/test_precision.py \
      2>&1 | tail -5 | tee "$out/tests.txt"
    torchrun --standalone --nproc_per_node 1 exp10_periodic_ses.py --smoke --device cuda --configs ses_k1 \
      --out-dir "$out/torchrun" 2>&1 | tail -5 | tee "$out/torchrun.txt"
    python exp10_periodic_ses.py --smoke --device cuda --configs ses_k1 --tensorboard --out-dir "$out/tb" \
      2>&1 | tail -3 | tee "$out/tensorboard.txt"
    find "$out/torchrun" "$out/tb" -name result.json -exec python -c \
      "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], r['ses_solver'], r.get('ses_solver_rejected'))" {} \;
    ;;
  bf16|fp16)
    python bench/bench_ses.py --amp "$part" --compile --profile --json "$out/bench_$part.json" 2>&1 \
      | tee "$out/bench_$part.txt"
    ;;
  *) echo "unknown part $part: use checks, bf16 or fp16" >&2; exit 2 ;;
esac
