"""Bandwidth of a PeerLink (ipc/peer_link.py: the two-process torch.distributed link that moves
tensors where memory cannot be mapped) between two processes of this machine, for the sizes a
cross-host EPD moves: one image's embeddings, a prefill's KV blocks, a layer of weights.

    python scripts/bench_link.py [--backend gloo] [--sizes-mb 4.7,75,300] [--repeats 5]

gloo moves CPU tensors over TCP (here: loopback, so this is the software ceiling of the path, not a
network's); nccl moves GPU tensors (two GPUs: rank r on cuda:r). Each size: one warm-up send, then
the median of --repeats timed sends (the receiver acknowledges each, so a send's time is
end to end).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipc.peer_link import PeerLink, free_port  # noqa: E402


def receiver(port: int, backend: str, sizes: list[int], repeats: int) -> None:
    device = torch.device("cuda", 1) if backend == "nccl" else torch.device("cpu")
    link = PeerLink("127.0.0.1", port, rank=1, backend=backend, device=device if backend == "nccl" else None)
    ack = torch.zeros(1, dtype=torch.uint8, device=device)
    for n in sizes:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
        for _ in range(repeats + 1):
            link.recv(buf)
            link.send(ack)
    link.close()


def main(argv: list[str] | None = None) -> int:
    import multiprocess as mp

    from engine.cli import ArgumentParser, positive_int

    p = ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                   help="gloo: CPU tensors over TCP; nccl: GPU tensors (two GPUs)")
    p.add_argument("--sizes-mb", default="4.7,75,300", help="message sizes in MB (10^6 bytes), comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed sends per size (the median is kept)")
    args = p.parse_args(argv)
    positive_int("--repeats", args.repeats)
    sizes = [int(float(x) * 1e6) for x in args.sizes_mb.split(",")]
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        print("error: --backend nccl needs two GPUs (rank r on cuda:r)", file=sys.stderr)
        return 2
    port = free_port()
    proc = mp.get_context("spawn").Process(target=receiver, args=(port, args.backend, sizes, args.repeats))
    proc.start()
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    link = PeerLink("127.0.0.1", port, rank=0, backend=args.backend, device=device if args.backend == "nccl" else None)
    ack = torch.zeros(1, dtype=torch.uint8, device=device)
    path = "loopback TCP" if args.backend == "gloo" else "NCCL"
    print(f"PeerLink {args.backend}, two processes on this machine ({path})")
    print("| message | median ms | GB/s |")
    print("|---|---|---|")
    for n in sizes:
        data = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
        times = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            link.send(data)
            link.recv(ack)
            if i:
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        print(f"| {n / 1e6:.1f} MB | {ms:.2f} | {n / ms / 1e6:.2f} |", flush=True)
    link.close()
    proc.join(60)
    return 0 if proc.exitcode == 0 else 1


if __name__ == "__main__":
    from engine.cli import run_main

    sys.exit(run_main(main))
