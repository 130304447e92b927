"""A child process started with this folder on PYTHONPATH and SES_TEST_PRETEND_GPU=<card>:<count>
(tests/test_pretend_gpu.py) runs under fake_cuda.PretendGPUs: CUDA's bookkeeping only."""
import os
import sys

if os.environ.get("SES_TEST_PRETEND_GPU"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fake_cuda import PretendGPUs

    _card, _, _count = os.environ["SES_TEST_PRETEND_GPU"].partition(":")
    PretendGPUs(_card, int(_count or 1)).install()
    sys.path.pop(0)
