"""CUDA-graph capture and replay for decode (see decode_graphs.py)."""
