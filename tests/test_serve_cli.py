"""`adallm serve` as a user runs it: a real process serving the demo model on 127.0.0.1, stopped by SIGTERM."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from serve_helpers import free_port

RAYLET = "ray/core/src/ray/raylet/raylet"


def _raylets(parent: int | None = None) -> set[int]:
    """Raylet processes: every Ray's on this machine, or those `parent` started."""
    out = subprocess.run(["pgrep", "-f", RAYLET], capture_output=True, text=True).stdout
    pids = {int(pid) for pid in out.split()}
    return pids if parent is None else {pid for pid in pids if _status(pid).get("PPid") == str(parent)}


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _state(pid: int) -> str:
    """Why a raylet outlived its driver: stopped, in a syscall, orphaned."""
    status = _status(pid)
    return f"{pid}: state {status.get('State', 'gone')}, parent {status.get('PPid')}"


def test_sigterm_as_soon_as_the_endpoint_answers_stops_serve_and_ray():
    """A `kill` can land while `serve.run` is still confirming a deployment that already answers: it gets the same
    clean stop as Ctrl-C (exit status 0, 'shutting down'), and the Ray that the command started is gone after it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [str(Path(sys.executable).with_name("adallm")), "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    started: set[int] = set()  # its own raylet, not another Ray's (a test before may have left one starting up)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"adallm serve exited during start-up:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "adallm serve did not answer within 300 s"
            started = started or _raylets(parent=proc.pid)
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert started, "adallm serve did not start a Ray of its own"
        output = proc.communicate(timeout=90)[0]
        assert proc.returncode == 0, output[-3000:]
        assert "adallm: shutting down" in output
        deadline = time.monotonic() + 30
        while _raylets() & started and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _raylets() & started
        assert not left, f"the Ray that `adallm serve` started is still running: {[_state(pid) for pid in left]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_deployment_that_fails_says_why_and_leaves_no_ray(tmp_path):
    """A replica that cannot load its model fails the deployment: the command prints the replica's own error (the
    path and host it looked on), not only Serve's 'failed to update the deployments', exits 1 and stops its Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    missing = tmp_path / "Qwen3-8B-NVFP4-typo"
    cmd = [str(Path(sys.executable).with_name("adallm")), "serve", str(missing), "--host", "127.0.0.1", "--port",
           str(free_port()), "--device", "cpu"]
    before = _raylets()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, start_new_session=True)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"model '{missing}': no such folder on host" in proc.stderr, proc.stderr[-3000:]
    deadline = time.monotonic() + 30
    while _raylets() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _raylets() - before
