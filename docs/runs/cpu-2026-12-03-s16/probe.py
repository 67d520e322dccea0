"""The machine's one-core speed over time: 200 products of 256x256 fp32 matrices, every 0.5 s for 150 s."""

import statistics
import time

import torch

torch.set_num_threads(1)
a = torch.randn(256, 256)


def once() -> float:
    t = time.perf_counter()
    for _ in range(200):
        a @ a
    return (time.perf_counter() - t) * 1000


out = []
t0 = time.time()
while time.time() - t0 < 150:
    out.append(round(once(), 1))
    time.sleep(0.5)
print(len(out), f"min {min(out):.1f} p50 {statistics.median(out):.1f} max {max(out):.1f}")
print(out)
