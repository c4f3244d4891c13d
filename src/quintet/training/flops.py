"""How fast the hardware could go: the peak FLOP rate that model FLOPs utilisation (MFU) divides by.

MFU = (the model's forward + backward FLOPs per second, from ``Task.batch_flops``) / (the device's
peak). On a GPU the peak is the datasheet's dense rate for the training precision (bf16 tensor cores,
or plain fp32); on the CPU, which has no datasheet number a run could trust, it is the rate of a large
float32 matmul measured once per process. ``count_flops`` counts what a call actually runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Dense (no sparsity) peak FLOP/s of known GPUs: (name fragment, bf16 tensor core, fp32 non-tensor core).
# Ordered so that a more specific name comes before a shorter one it contains.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 80e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)


def _cpu_attention_flops() -> dict:
    """FlopCounterMode's formulas for the CPU's fused attention kernel, which it does not count itself
    (it does count the CUDA kernels): the same counts as for any other SDPA kernel."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    # FlopCounterMode hands these the shapes of the op's tensor arguments
    def forward(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs that one call of ``fn`` runs through matmuls / convolutions / attention (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        fn()
    return float(counter.get_total_flops())


_MATMUL_RATE: dict[tuple[str, str, int, int], float] = {}


def matmul_flops_per_s(
    *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024
) -> float:
    """This machine's measured dense matmul rate in FLOP/s (once per process, device, dtype, size, threads).

    The yardstick of "within 1.5x of the time its FLOPs need": a step's FLOPs divided by this rate is
    the time the hardware needs at best, at the current thread count.
    """
    import torch.utils.benchmark as torch_benchmark

    device = torch.device(device)
    key = (str(device), str(dtype), size, torch.get_num_threads())
    if key not in _MATMUL_RATE:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)

        def matmul():
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()

        matmul()  # warm-up
        timer = torch_benchmark.Timer(stmt="matmul()", globals={"matmul": matmul}, num_threads=torch.get_num_threads())
        _MATMUL_RATE[key] = 2 * size**3 / timer.blocked_autorange(min_run_time=0.3).median
    return _MATMUL_RATE[key]


def peak_flops_per_s(device: torch.device, dtype: torch.dtype | None) -> tuple[float, str]:
    """The peak FLOP/s of one ``device`` computing in ``dtype`` (None: float32), and where it comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, bf16, fp32 in GPU_PEAKS:
            if fragment in name:
                low_precision = dtype in (torch.bfloat16, torch.float16)
                return (bf16 if low_precision else fp32), f"{name} datasheet, {'bf16' if low_precision else 'fp32'}"
        # an unknown GPU: measure it like a CPU
    rate = matmul_flops_per_s(device=device, dtype=dtype or torch.float32)
    return rate, f"measured {str(dtype or torch.float32).removeprefix('torch.')} matmul on {device.type}"
