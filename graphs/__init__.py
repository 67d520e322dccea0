"""CUDA-graph capture and replay: decode steps (decode_graphs.py), the vision tower
(vision_graphs.py), and the capture step both use (capture.py). The graph classes take the model,
ops and tensors they run on explicitly, and plain per-row batches: they know no requests."""
