"""Run a script under the Triton CPU interpreter in a subprocess and read the JSON of its last line. The interpreter
is switched on by an environment variable read at import time, so setting it in the test process would change how
every later-imported kernel behaves there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(script: Path, timeout: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
