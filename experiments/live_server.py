"""`paged-jax serve` as a subprocess on a loopback port, for experiments that drive the
server with outside clients (lm_eval_parity.py, real_clients.py)."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY = "experiment-key"  # the API key the server is started with


def serve(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "paged_jax", "serve", "--model", model, "--port", str(port),
           "--api-key", KEY, "--served-model-name", "m", "--no-access-log",
           "--max-model-len", "512", "--max-num-seqs", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 600 s")
