"""The one model definition: CLIP vision tower, projector and Llama LM, over a backend's ops."""
