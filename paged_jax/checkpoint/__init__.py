"""Checkpoint reading: model folders, safetensors and GGUF conversion. The public names are in paged_jax.weights."""
