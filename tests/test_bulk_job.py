"""The bulk job on a real local Ray (one head per module, started like a user would: `ray start --head`).

One input file (mixed lengths, unicode, chat rows, per-row params, bad rows) and one offline-LLM reference
serve every test: the plain run, an engine replica killed mid-job, a driver killed and restarted, and
`ray job submit`. Each checks the output holds every input row exactly once and matches the reference.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adallm_core import LLM, SamplingParams

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ROWS = 208
ENGINE_FLAGS = ["--max-model-len", "256", "--num-gpu-blocks-override", "256", "--max-num-seqs", "16"]
JOB_FLAGS = ["--prompt-column", "prompt", "--messages-column", "messages", "--max-tokens", "4", "--temperature", "0",
             "--batch-size", "8", *ENGINE_FLAGS]
WORDS = ["alpha", "Grüße", "世界", "naïve", "🙂", "beta", "œuvre", "gamma", "ß", "delta"]
BAD = {  # row key -> what the error must say
    5: "prompt is null", 13: "prompt is empty", 21: "prompt has", 34: "temperature=-1.0", 55: "max_tokens=0",
    89: "needs string 'role' and 'content'",
}


def _input_table() -> pa.Table:
    prompts, messages, max_tokens, temperature, seed = [], [], [], [], []
    for key in range(ROWS):
        text = " ".join(WORDS[(key + j) % len(WORDS)] for j in range(1 + key % 17))  # 1..17 words
        is_chat = key % 7 == 3
        prompts.append(None if is_chat else text)
        messages.append([{"role": "system", "content": "Answer."}, {"role": "user", "content": text}] if is_chat
                        else None)
        max_tokens.append(1 + key % 6 if key % 3 == 0 else None)
        temperature.append(0.8 if key % 10 == 9 else None)  # sampled rows: seeded, not compared to the reference
        seed.append(key if key % 10 == 9 else None)
    prompts[5], prompts[13], prompts[21] = None, "", "long " * 80  # null, empty, over max_model_len (byte-level tokens)
    temperature[34], max_tokens[55] = -1.0, 0
    messages[89], prompts[89] = [{"role": "user", "content": None}], None
    return pa.table({
        "key": pa.array(range(ROWS), type=pa.int64()),
        "prompt": pa.array(prompts, type=pa.string()),
        "messages": pa.array(messages, type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        "max_tokens": pa.array(max_tokens, type=pa.int64()),
        "temperature": pa.array(temperature, type=pa.float64()),
        "seed": pa.array(seed, type=pa.int64()),
    })


@pytest.fixture(scope="module")
def input_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bulk_in") / "prompts.parquet"
    pq.write_table(_input_table(), path, row_group_size=64)  # several row groups: ids must still be stable
    return path


@pytest.fixture(scope="module")
def offline() -> dict:
    """key -> the offline LLM API's RequestOutput, greedy rows only, prompts scored too (prompt_logprobs=0)."""
    llm = LLM(max_model_len=256, num_gpu_blocks_override=256, max_num_seqs=16)
    table = _input_table().to_pylist()
    greedy = [r for r in table if r["key"] not in BAD and r["temperature"] is None]
    params = [SamplingParams(max_tokens=r["max_tokens"] or 4, temperature=0.0, prompt_logprobs=0) for r in greedy]
    plain = [(r, p) for r, p in zip(greedy, params) if r["prompt"] is not None]
    chat = [(r, p) for r, p in zip(greedy, params) if r["prompt"] is None]
    outs = llm.generate([r["prompt"] for r, _ in plain], [p for _, p in plain], use_tqdm=False)
    outs += llm.chat([r["messages"] for r, _ in chat], [p for _, p in chat], use_tqdm=False)
    return dict(zip([r["key"] for r, _ in plain + chat], outs))


@pytest.fixture(scope="module")
def reference(offline) -> dict[int, tuple]:
    """key -> (text, finish_reason, prompt tokens, generated tokens)."""
    return {k: (o.outputs[0].text, o.outputs[0].finish_reason, len(o.prompt_token_ids), len(o.outputs[0].token_ids))
            for k, o in offline.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block`, stopped by signalling that process (a plain `ray stop` would stop every Ray
    on the machine, other users' included). Drivers run in their own processes, as users' do."""
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's unix socket paths live under it
    # Ray's token auth: the head and every client (drivers, `ray job submit`) read this file; a client joining an
    # existing cluster only sends it when told to. `ray start` does not create one, and ~/.ray/auth_token exists
    # only where a local `ray.init()` ran before, so the head gets its own.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_raylet_start_wait_time_s": "120", "RAY_agent_register_timeout_ms": "120000"}
    for attempt in range(3):  # start-up on a loaded 2-core machine can exceed Ray's fixed 30 s waits
        port, dashboard = _free_port(), _free_port()
        log = Path(temp_dir) / f"head{attempt}.log"
        with open(log, "w") as sink:
            head = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=3",
                 f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                 f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while head.poll() is None and "Ray runtime started" not in log.read_text() and time.time() < deadline:
            time.sleep(1)
        if head.poll() is None and "Ray runtime started" in log.read_text():
            break
        _stop(head)
    else:
        pytest.fail(f"could not start a local Ray head in 3 tries; see {temp_dir}")
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # for the drivers; `ray job submit` gets --address instead
    try:
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "temp_dir": temp_dir}
    finally:
        _stop(head)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` makes it stop the processes it started; its group is killed if it hangs."""
    head.terminate()
    try:
        head.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def _job_args(input_file: Path, output: Path, *extra: str) -> list[str]:
    return ["--input", str(input_file), "--output", str(output), *JOB_FLAGS, *extra]


def _check_output(output: Path, reference: dict, id_column: str = "row_hash") -> pa.Table:
    """Every input row exactly once, input columns intact, errors only on bad rows, greedy rows = reference."""
    table = pq.read_table(output)  # pyarrow skips the job's ".tmp-" and "_summary.json" files, as users' readers do
    keys = table.column("key").to_pylist()
    assert sorted(keys) == list(range(ROWS)), "rows lost or duplicated"
    assert len(set(table.column(id_column).to_pylist())) == ROWS
    assert id_column == "row_hash" or "row_hash" not in table.column_names  # a given id column is the only id
    rows = {r["key"]: r for r in table.to_pylist()}
    source = {r["key"]: r for r in _input_table().to_pylist()}
    for key, row in rows.items():
        assert {k: row[k] for k in source[key]} == source[key]
        if key in BAD:
            assert BAD[key] in row["error"], (key, row["error"])
            assert row["generated_text"] is None
            continue
        assert row["error"] is None, (key, row["error"])
        if key in reference:
            got = (row["generated_text"], row["finish_reason"], row["num_prompt_tokens"], row["num_generated_tokens"])
            assert got == reference[key], key
    return table


def _engine_replicas(temp_dir: str) -> set[int]:
    """Pids of this head's engine replica processes (Ray names them ray::MapWorker(MapBatches(EngineActor)))."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(pid)] = (cmd[0].decode(errors="replace"), b" ".join(cmd).decode(errors="replace"), ppid)
    raylets = {pid for pid, (exe, cmd, _) in procs.items() if exe.endswith("/raylet") and temp_dir in cmd}
    return {pid for pid, (exe, _, ppid) in procs.items() if ppid in raylets and "EngineActor" in exe}


def _driver(ray_head, args: list[str], **kwargs):
    cmd = [sys.executable, "-m", "jobs.bulk_generate", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ray_head["env"], text=True, **kwargs)


@pytest.mark.timeout(600)
def test_job_output_matches_offline_llm(ray_head, input_file, reference, tmp_path):
    assert len(reference) > 150
    out = tmp_path / "out"
    done = _driver(ray_head, _job_args(input_file, out, "--concurrency", "2"), stdout=subprocess.PIPE)
    stdout, _ = done.communicate(timeout=500)
    assert done.returncode == 0
    _check_output(out, reference)
    assert stdout.strip().splitlines()[-1].startswith(
        f"bulk_generate: {ROWS} rows ({len(BAD)} failed, 0 already written)")
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["rows"], summary["rows_failed"]) == (ROWS, len(BAD))
    assert summary["generated_tokens"] == sum(filter(None, pq.read_table(out).column("num_generated_tokens").to_pylist()))

    # a killed run's last write that landed after this one listed the folder (a quick restart): rows held twice,
    # which the next run leaves once
    part = sorted(out.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(0, 5), out / "part-late.parquet")
    again = _driver(ray_head, _job_args(input_file, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert f"0 rows (0 failed, {ROWS} already written, 5 written twice, now once)" in stdout
    assert "removed 5 duplicate row(s)" in stderr
    _check_output(out, reference)


@pytest.mark.timeout(600)
def test_engine_replica_killed_mid_job(ray_head, input_file, reference, tmp_path):
    out = tmp_path / "out"
    job = _driver(ray_head, _job_args(input_file, out, "--concurrency", "2"), stdout=subprocess.DEVNULL)
    deadline = time.time() + 400
    while job.poll() is None and not list(out.glob("part-*.parquet")) and time.time() < deadline:
        time.sleep(0.2)  # wait until it is under way
    replicas = _engine_replicas(ray_head["temp_dir"])
    assert job.poll() is None and len(replicas) == 2, "job ended before a replica could be killed"
    victim = min(replicas)
    os.kill(victim, signal.SIGKILL)
    # Whether a replacement replica starts before the job ends depends on how much work is left: with the tiny
    # model the survivor may finish the victim's rows first (seen on an idle machine), so only the outcome counts.
    assert job.wait(timeout=max(60, deadline - time.time())) == 0
    assert len(list(out.glob("part-*.parquet"))) > 1
    _check_output(out, reference)


@pytest.mark.timeout(600)
def test_driver_killed_then_restarted_skips_written_rows(ray_head, input_file, reference, tmp_path):
    out = tmp_path / "out"
    args = _job_args(input_file, out, "--concurrency", "1")
    first = _driver(ray_head, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while first.poll() is None and len(list(out.glob("part-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed"
    first.kill()
    first.wait()
    while _engine_replicas(ray_head["temp_dir"]) and time.time() < deadline:  # Ray ends the dead driver's workers
        time.sleep(0.5)
    time.sleep(3)
    written = pq.read_table(out).num_rows
    assert 0 < written < ROWS

    second = _driver(ray_head, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = second.communicate(timeout=400)
    assert second.returncode == 0, stderr[-3000:]
    assert f"bulk_generate: {ROWS - written} rows" in stdout
    assert f"{written} already written" in stdout
    _check_output(out, reference)

    # Once every row is written, a rerun starts no engine (on a cluster it launched GPU nodes to write nothing):
    # asking for a GPU this CPU head lacks, an engine would wait forever.
    third = _driver(ray_head, args + ["--num-gpus", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = third.communicate(timeout=120)
    finally:
        third.kill()
    assert third.returncode == 0, stderr[-3000:]
    assert f"bulk_generate: 0 rows (0 failed, {ROWS} already written)" in stdout and "no engine started" in stderr
    _check_output(out, reference)


PROCESSOR_DRIVER = """
import sys, ray
from adallm_core import EngineArgs
from jobs.processor import ProcessorConfig, build_processor
from jobs.rows import RowSpec
rows = [{"key": int(k), "question": p} for k, p in zip(sys.argv[2::2], sys.argv[3::2])]
processor = build_processor(ProcessorConfig(
    engine_args=EngineArgs(max_model_len=256, num_gpu_blocks_override=256, max_num_seqs=16),
    rows=RowSpec(prompt_column="question", sampling_defaults={"max_tokens": 4, "temperature": 0.0}),
    batch_size=4, concurrency=(1, 2)))
processor(ray.data.from_items(rows)).write_parquet(sys.argv[1])
"""


@pytest.mark.timeout(600)
def test_processor_on_any_dataset(ray_head, reference, tmp_path):
    """The Python API users compose with: any ray.data.Dataset (here from_items, another prompt column name),
    an autoscaling (1, 2) replica range, Ray Data's own writer."""
    rows = [r for r in _input_table().to_pylist() if r["key"] in reference and r["prompt"] is not None
            and r["max_tokens"] is None][:24]
    out = tmp_path / "out"
    args = [str(out)] + [v for r in rows for v in (str(r["key"]), r["prompt"])]
    done = subprocess.run([sys.executable, "-c", PROCESSOR_DRIVER, *args], cwd=REPO, env=ray_head["env"],
                          capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(out)
    assert sorted(table.column("key").to_pylist()) == sorted(r["key"] for r in rows)
    for row in table.to_pylist():
        got = (row["generated_text"], row["finish_reason"], row["num_prompt_tokens"], row["num_generated_tokens"])
        assert row["error"] is None and got == reference[row["key"]], row["key"]


@pytest.mark.timeout(600)
def test_ray_job_submit(ray_head, input_file, reference, offline, tmp_path):
    """Submitted as users do, with the prompts scored as well (--prompt-logprobs)."""
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
           "--", "python", "-m", "jobs.bulk_generate",
           *_job_args(input_file, out, "--concurrency", "1", "--id-column", "key", "--prompt-logprobs")]
    done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert f"bulk_generate: {ROWS} rows ({len(BAD)} failed" in done.stdout
    table = _check_output(out, reference, id_column="key")
    for row in table.to_pylist():
        if row["key"] in offline:
            o = offline[row["key"]]
            want = [entry[t] for t, entry in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
            assert row["prompt_logprobs"][0] is None and row["prompt_logprobs"][1:] == pytest.approx(want, abs=1e-5)
        elif row["key"] in BAD:
            assert row["prompt_logprobs"] is None
