"""The OpenAI-compatible server (needs the serve extras: fastapi, uvicorn, prometheus-client)."""
from paged_jax.server.app import create_app

__all__ = ["create_app"]
