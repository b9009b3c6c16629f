"""Test support for the deployment files: what ``muxserve serve`` makes of an argument list, and
the HTTP routes the server answers GET on (for probes and health checks), and the kserve SDK
run in its own process.

Imported by tests/test_deploy_*.py and tests/test_kserve_clients.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

from helpers import ROOT

from muxserve.serving.settings import Settings

HTTP_APP = ROOT / "server" / "muxserve" / "serving" / "http" / "app.py"


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """``muxserve ARGV`` parsed by the real CLI (argparse exits on an unknown flag), not run."""
    import muxserve.cli.serve as serve_cli
    from muxserve.cli import main

    parsed: list[argparse.Namespace] = []
    original = serve_cli.run
    serve_cli.run = lambda a: parsed.append(a) or 0
    try:
        assert main(argv) == 0
    finally:
        serve_cli.run = original
    assert parsed, f"{argv} is not a `muxserve serve` command line"
    return parsed[0]


def serve_ports(a: argparse.Namespace) -> tuple[int, int]:
    """(HTTP port, gRPC port) a parsed ``muxserve serve`` listens on."""
    defaults = Settings()
    return a.http_port or defaults.http_port, a.grpc_port or defaults.grpc_port


def http_get_routes() -> set[str]:
    return set(re.findall(r'@app\.get\("([^"]+)"', HTTP_APP.read_text()))


def kserve_sdk(*args: str) -> dict:
    """Run tests/kserve_sdk.py in its own process (kserve and tritonclient cannot share one) and
    return the JSON it prints."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "kserve_sdk.py"), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)
