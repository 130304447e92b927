"""Every direct call into torch.cuda the suite makes (the cuSOLVER binding in ses_solvers keeps its
own): which device a process uses, what the card is, the precision it trains in, memory
statistics, timing events, synchronisation, RNG state. Everything else asks this module, so the
whole CUDA-only surface is here, and tests/test_pretend_gpu.py takes every branch on a CPU under a
stand-in for CUDA's bookkeeping (a pretend L40S and T4).

Devices: `pick(spec)` turns what the user gave (None, "cuda", "cuda:1", "cpu") into the one device
a process uses, always with an index on CUDA ("cuda" = the current device: cuda:0 until something
sets another); `use(device)` makes it current. The functions that take a device (a torch.device or
a string) do nothing, or return None, on a CPU.
"""
from __future__ import annotations

import contextlib
import os
import platform

import torch

CPU_ONLY = "CUDA is not available on this machine"


class DeviceError(ValueError):
    """A device the user named cannot be used here; the message says why and what to use."""


def available() -> bool:
    return torch.cuda.is_available()


def count() -> int:
    """How many GPUs this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def current_index() -> int:
    """The current CUDA device's index without initialising CUDA (0 before anything sets one)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def pick(spec: str | None, default_cpu: bool = False) -> torch.device:
    """The device a process uses: `spec` as given (cpu, cuda, cuda:N), or by default the current GPU
    if there is one (the CPU when `default_cpu`, e.g. for --smoke). "cuda" without an index means
    the current device, returned with its index. Raises DeviceError with one line otherwise."""
    if spec is None:
        spec = "cpu" if default_cpu or not available() else "cuda"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"{spec!r} is not a device (use cuda, cuda:0 or cpu)") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"{spec!r}: only cuda and cpu devices are supported")
    if not available():
        raise DeviceError(f"{CPU_ONLY}; use --device cpu")
    index = current_index() if device.index is None else device.index
    if index >= count():
        raise DeviceError(f"{spec!r}: this machine has {count()} GPU(s) (cuda:0 to cuda:{count() - 1})")
    return torch.device("cuda", index)


def use(device: torch.device) -> None:
    """Make `device` this process's current GPU (every later CUDA call, cuSOLVER's too, goes there)
    and let cuDNN pick its fastest kernels for the fixed shapes of training."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(device)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def name(device) -> str:
    """'NVIDIA L40S', or 'cpu (x86_64)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def describe(device) -> str:
    """'cuda:1 (Tesla T4, 14.7 GiB)' or 'cpu (x86_64)': the device with its index, the card and its
    memory, and the CUDA_VISIBLE_DEVICES that maps its index to the machine's GPU where one is set."""
    device = torch.device(device)
    if device.type != "cuda":
        return name(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{device} ({name(device)}, {total_memory(device) / 2 ** 30:.1f} GiB" + \
        (f"; CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ")")


def capability(device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if is_cuda(device) else None


def total_memory(device) -> int | None:
    """The card's memory in bytes (get_device_properties(i).total_memory), None on a CPU."""
    return torch.cuda.get_device_properties(device).total_memory if is_cuda(device) else None


FORCED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
AMP_MODES = ("auto", *FORCED_PRECISION)  # what --amp may name


def amp_dtype(device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype of precision `mode` on `device` (None = float32).

    'auto': bfloat16 on compute capability >= 8.0 (A100, L40S, H100), float16 (with a GradScaler)
    below, whatever is_bf16_supported() says (a T4 is 7.5 and that call counts bf16 emulation);
    float32 on a CPU. 'bf16' / 'fp16' / 'fp32' force that path on any device."""
    if mode in FORCED_PRECISION:
        return FORCED_PRECISION[mode]
    if mode != "auto":
        raise ValueError(f"unknown amp mode {mode!r}; use {', '.join(AMP_MODES)}")
    if not is_cuda(device):
        return None
    return torch.bfloat16 if capability(device) >= (8, 0) else torch.float16


# ----------------------------------------------------------------------------- memory, time, sync
def reset_peak(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    """Bytes of tensors allocated at the peak since the last reset_peak (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) if is_cuda(device) else None


def free_cached(device) -> None:
    """Return the caching allocator's unused blocks to the card (between runs, after an OOM)."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def synchronize(device) -> None:
    """Wait for the device's queued work (the host waits; only where a wall-clock time needs it)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def guard(device):
    """Make `device` current inside the block (a CPU: nothing)."""
    return torch.cuda.device(device) if is_cuda(device) else contextlib.nullcontext()


def timing_event():
    """A CUDA event that records time (record, synchronize, elapsed_time in ms)."""
    return torch.cuda.Event(enable_timing=True)


def _float32_switches() -> list[tuple[object, str, object]]:
    """(object, attribute, its IEEE value) of each float32 switch: torch >= 2.9's fp32_precision settings
    (once they are set, reading the legacy allow_tf32 flags raises), else the allow_tf32 flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def strict_float32():
    """Inside: float32 matmuls and convolutions in IEEE float32, TF32 off (on Ampere and newer cuBLAS and
    cuDNN use TF32 for float32 by default), so an L40S computes in the T4's precision; the switches are
    put back after. The results then agree to float32 round-off, not bit for bit: cuDNN still picks
    its algorithms per card."""
    switches = _float32_switches()
    saved = [getattr(obj, attr) for obj, attr, _ in switches]
    try:
        for obj, attr, ieee in switches:
            setattr(obj, attr, ieee)
        yield
    finally:
        for (obj, attr, _), value in zip(switches, saved):
            setattr(obj, attr, value)


def rng_state(device) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(device) if is_cuda(device) else None


def set_rng_state(state: torch.Tensor | None, device) -> None:
    if state is not None and is_cuda(device):
        torch.cuda.set_rng_state(state, device)
