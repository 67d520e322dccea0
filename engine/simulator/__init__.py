"""A discrete-event simulator of the engine (epd, pd and aggregated modes) over a measured cost
model, and a placement search on it. Pure Python + numpy: no torch, no processes.

- cost_model.py: `CostModel`, measured stage times (the profiler's JSON), interpolated, and its
  optional `Calibration` (fixed per-request and per-encode-batch overheads, a shared GPU's
  time-slicing loss; fitted by scripts/fit_simulator.py)
- workload.py: `Phase`, `parse_phases`, `arrival_offsets` (bench_serve's), `phase_arrivals`
- metrics.py: TTFT / TPOT percentiles, SLO attainment, goodput (bench_serve's definitions)
- events.py: the event loop and the GPU sharing model (`ProcessorSharing`)
- stages.py, aggregated.py: the instances (encoder with its cache of image keys, prefill, decode;
  the aggregated engine)
- sim.py: `simulate` / `Simulation`, a run of a workload on a placement; per-request records
- search.py: placements for N GPUs ranked by goodput per GPU
- compare.py: predicted vs measured on bench_serve.py's records (one server's rates: images repeated)
"""
