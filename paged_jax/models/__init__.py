"""Model definitions. Each architecture maps a Hugging Face config to a `ModelConfig`."""
