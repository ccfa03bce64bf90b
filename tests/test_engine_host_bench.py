"""benchmarks.engine_host on the CPU: its stand-in runner and tokenizers must keep up with what the engine reads of
them (a benchmark nothing runs breaks unseen)."""
from benchmarks import engine_host


def test_the_host_time_benchmark_runs_on_its_stand_ins(capsys):
    assert engine_host.main(["--batch", "2", "--reps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(t, m, "2") for t in ("silent", "tiny") for m in ("greedy", "seeded")]
    assert all(float(r[3]) > 0 for r in rows)
