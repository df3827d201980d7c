"""bf16 against fp32 matmul rates (GFLOP/s) on this CPU, at a compile's shapes.

    python matmul_rate.py
"""
import time

import torch


def rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n / ((time.perf_counter() - t0) / reps) / 1e9


if __name__ == "__main__":
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    print(torch.__version__, "threads", torch.get_num_threads(), "AMX", amx)
    for shape in [(646, 640, 2048), (646, 2048, 640), (1508, 640, 2048), (2048, 2048, 2048),
                  (64, 640, 262144)]:
        print(shape, f"bf16 {rate(*shape, torch.bfloat16):.0f}  "
                     f"fp32 {rate(*shape, torch.float32):.0f}")
