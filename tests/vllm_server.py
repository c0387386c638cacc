"""Start and stop a real vLLM OpenAI-compatible server on 127.0.0.1 for the tests that need one
(`python -m vllm.entrypoints.openai.api_server`); skipped where vLLM is not installed."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

SKIP_REASON = "vLLM is not installed here: `make vllm` builds .venv-vllm, where CI runs this"


@contextmanager
def vllm_server(
    model_dir: Path, *arguments: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """The address `http://127.0.0.1:PORT` of a vLLM server serving `model_dir` (fp32, eager,
    a small share of RAM), stopped on exit; its log is `model_dir/server.log`."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(SKIP_REASON)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
    ]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--enforce-eager", "--max-model-len", "256"]
    command += ["--gpu-memory-utilization", "0.2", *arguments]  # on CPU: the share of RAM
    log_path = model_dir / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the vLLM server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("the vLLM server did not start within 300 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
