"""Bulk job pieces without a Ray cluster: rows -> requests, schema and argument checks, resume bookkeeping."""
from __future__ import annotations

import argparse
import json
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from adallm_core.testing import demo_model_path
from adallm_core.tokenizer import Tokenizer
from jobs import bulk_generate, resume
from jobs.rows import OUTPUT_SCHEMA, RowResult, RowSpec, check_schema, output_table, prepare_rows
from jobs.summary import JobSummary, block_stats


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo_model_path())


def test_per_row_params_override_defaults(tokenizer):
    batch = pa.table({
        "prompt": ["a", "b", "c"],
        "max_tokens": pa.array([None, 7.0, 3], type=pa.float64()),  # pandas-style: integers with nulls as floats
        "temperature": [None, 0.5, None],
        "stop": [None, ["x", "y"], None],
        "seed": pa.array([None, None, 11], type=pa.int64()),
    })
    spec = RowSpec(sampling_defaults={"max_tokens": 9, "temperature": 0.0, "top_p": 0.9})
    a, b, c = prepare_rows(batch, spec, tokenizer)
    assert (a.error, b.error, c.error) == (None, None, None)
    assert (a.params.max_tokens, a.params.temperature, a.params.top_p, a.params.seed) == (9, 0.0, 0.9, None)
    assert (b.params.max_tokens, b.params.temperature, b.params.stop) == (7, 0.5, ["x", "y"])
    assert (c.params.max_tokens, c.params.seed) == (3, 11)
    assert a.prompt == "a"


def test_bad_rows_get_an_error_naming_the_problem(tokenizer):
    batch = pa.table({
        "prompt": [None, "", "ok", "ok", "ok", None],
        "messages": [None, None, None, None, None, [{"role": "user", "content": None}]],
        "max_tokens": pa.array([None, None, 2.5, 0, None, None]),
        "temperature": [None, None, None, None, -1.0, None],
    })
    spec = RowSpec(prompt_column="prompt", messages_column="messages")
    errors = [r.error for r in prepare_rows(batch, spec, tokenizer)]
    assert "prompt is null" in errors[0]
    assert "prompt is empty" in errors[1]
    assert "max_tokens=2.5" in errors[2]
    assert "max_tokens=0" in errors[3]
    assert "temperature=-1.0" in errors[4]
    assert "'content'" in errors[5]


def test_chat_rows_match_the_models_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, 世界!"}]
    batch = pa.table({"prompt": [None, "plain"], "messages": [messages, None]})
    chat, plain = prepare_rows(batch, RowSpec(prompt_column="prompt", messages_column="messages"), tokenizer)
    hf = AutoTokenizer.from_pretrained(demo_model_path())
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.prompt == hf.encode(text, add_special_tokens=False)
    assert plain.prompt == "plain"


def test_output_keeps_input_columns_with_fixed_types():
    batch = pa.table({"prompt": ["a", "b"], "extra": [1, 2]})
    out = output_table(batch, [RowResult(error="bad"), RowResult(error="bad too")])  # all-null text columns
    assert out.schema.names == ["prompt", "extra"] + OUTPUT_SCHEMA.names
    assert out.schema.field("generated_text").type == pa.string()
    assert out.column("extra").to_pylist() == [1, 2]
    assert block_stats(out) == {"rows": 2, "rows_failed": 2, "prompt_tokens": 0, "generated_tokens": 0}


def test_scored_prompts_add_a_prompt_logprobs_column():
    scored = RowSpec(sampling_defaults={"prompt_logprobs": 0})
    assert scored.output_schema.names == OUTPUT_SCHEMA.names[:-1] + ["prompt_logprobs", "error"]
    out = output_table(pa.table({"prompt": ["a", "b"]}), [RowResult(prompt_logprobs=[None, -1.5]), RowResult(error="x")],
                       scored.output_schema)
    assert out.schema.field("prompt_logprobs").type == pa.list_(pa.float64())
    assert out.column("prompt_logprobs").to_pylist() == [[None, -1.5], None]
    assert RowSpec().output_schema == OUTPUT_SCHEMA  # unscored jobs keep their columns
    check_schema(pa.schema([("prompt", pa.string()), ("prompt_logprobs", pa.string())]), RowSpec(), "in.parquet")


@pytest.mark.parametrize(
    "schema, spec, message",
    [
        (pa.schema([("prompt", pa.string()), ("prompt_logprobs", pa.string())]),
         RowSpec(sampling_defaults={"prompt_logprobs": 0}), "output column(s) ['prompt_logprobs']"),
        (pa.schema([("text", pa.string())]), RowSpec(), "no column 'prompt' (--prompt-column)"),
        (pa.schema([("prompt", pa.int64())]), RowSpec(), "must hold strings"),
        (pa.schema([("prompt", pa.string()), ("temperature", pa.string())]), RowSpec(), "'temperature'"),
        (pa.schema([("prompt", pa.string()), ("structured_outputs", pa.int64())]), RowSpec(), "'structured_outputs'"),
        (pa.schema([("prompt", pa.string()), ("error", pa.string())]), RowSpec(), "output column(s) ['error']"),
        # messages that no row could render: each row failed alone, once the engines had started
        (pa.schema([("chat", pa.list_(pa.string()))]), RowSpec(prompt_column=None, messages_column="chat"),
         "column 'chat' (--messages-column) must hold lists of {role, content}, it holds list<item: string>"),
        (pa.schema([("chat", pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())])))]),
         RowSpec(prompt_column=None, messages_column="chat"),
         "it holds list<item: struct<role: string, text: string>>"),
        (pa.schema([("chat", pa.list_(pa.map_(pa.string(), pa.string())))]),
         RowSpec(prompt_column=None, messages_column="chat"), "must hold lists of {role, content}"),
    ],
)
def test_schema_errors(schema, spec, message):
    with pytest.raises(ValueError, match="in.parquet") as info:
        check_schema(schema, spec, "in.parquet")
    assert message in str(info.value)


def test_large_lists_hold_messages_and_stops():  # what Polars writes
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    check_schema(pa.schema([("chat", pa.large_list(message)), ("stop", pa.large_list(pa.string()))]),
                 RowSpec(prompt_column=None, messages_column="chat"), "in.parquet")


def test_all_null_sampling_columns_are_accepted(tokenizer):
    """pandas writes a column of None as type null: every row takes the default, `stop` included."""
    schema = pa.schema([("prompt", pa.string())] + [(name, pa.null()) for name in ("stop", "temperature", "seed")])
    check_schema(schema, RowSpec(sampling_defaults={"stop": ["x"]}), "in.parquet")
    (row,) = prepare_rows(pa.table({"prompt": ["a"], "stop": pa.nulls(1)}), RowSpec(sampling_defaults={"stop": ["x"]}),
                          tokenizer)
    assert row.error is None and row.params.stop == ["x"]


def test_input_files_file_folder_glob(tmp_path):
    table = pa.table({"prompt": ["x"]})
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.parquet", "d/sub/b.parquet", "d/_c.parquet", "d/.tmp-x.parquet"):
        pq.write_table(table, tmp_path / name)
    fs = pafs.LocalFileSystem()
    root = str(tmp_path / "d")
    assert resume.input_files(fs, f"{root}/a.parquet") == [f"{root}/a.parquet"]
    assert resume.input_files(fs, root) == [f"{root}/a.parquet", f"{root}/sub/b.parquet"]
    assert resume.input_files(fs, f"{root}/*/*.parquet") == [f"{root}/sub/b.parquet"]
    # '*' stays within one folder level and, like a folder input, skips '_' and '.' names unless spelled out
    assert resume.input_files(fs, f"{root}/*.parquet") == [f"{root}/a.parquet"]
    assert resume.input_files(fs, f"{root}/_*.parquet") == [f"{root}/_c.parquet"]
    with pytest.raises(ValueError, match="no such file or folder"):
        resume.input_files(fs, f"{root}/missing.parquet")
    with pytest.raises(ValueError, match="no Parquet files"):
        resume.input_files(fs, f"{root}/*.csv")


def test_resume_ignores_temp_files_and_drops_written_rows(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    sink = resume.AtomicParquetDatasink(fs, root, "id")
    done = output_table(pa.table({"id": [1, 2]}), [RowResult(generated_text="a", num_generated_tokens=3)] * 2)
    stats = sink.write([done], ctx=None)
    assert stats["generated_tokens"] == 6
    again = sink.write([done], ctx=None)  # a retried write of the same rows lands on the same file
    assert again == stats and len(resume.part_files(fs, root)) == 1
    pq.write_table(pa.table({"id": [3]}), f"{root}/{resume.TEMP_PREFIX}torn-part-x.parquet")  # a killed write
    assert resume.written_ids(fs, root, "id").to_pylist() == [1, 2]
    assert resume.remove_temp_files(fs, root) == 1
    batch = pa.table({"id": [1, 2, 3, 4]})
    assert resume.drop_written(batch, "id", resume.written_ids(fs, root, "id")).column("id").to_pylist() == [3, 4]


def test_resume_with_dictionary_encoded_ids(tmp_path):
    """pandas categorical ids are written (and read back) dictionary-encoded; resume still matches them."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    ids = pa.array(["a", "b"]).dictionary_encode()
    done = output_table(pa.table({"id": ids}), [RowResult(generated_text="x", num_generated_tokens=1)] * 2)
    resume.AtomicParquetDatasink(fs, root, "id").write([done], ctx=None)
    batch = pa.table({"id": pa.array(["a", "c", "b", "d"]).dictionary_encode()})
    kept = resume.drop_written(batch, "id", resume.written_ids(fs, root, "id"))
    assert kept.column("id").to_pylist() == ["c", "d"]


def test_written_ids_across_id_types(tmp_path):
    """Part files typed int32 and int64 (from int32 and int64 input files): the ids already written were read with
    the first file's type, so a resume stopped on 'Integer value 1099511627776 not in range' whenever an int32
    file's name sorted first."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    _part(fs, root, [1, 2], id_type=pa.int32())
    _part(fs, root, [10, 2**40], id_type=pa.int64())
    assert [pq.read_schema(p).field("id").type for p in resume.part_files(fs, root)] == [pa.int32(), pa.int64()]
    assert sorted(resume.written_ids(fs, root, "id").to_pylist()) == [1, 2, 10, 2**40]
    batch = pa.table({"id": pa.array([2, 3, 2**40, 2**41], pa.int64())})
    assert resume.drop_written(batch, "id", resume.written_ids(fs, root, "id")).column("id").to_pylist() == [3, 2**41]


def test_footers_unify_the_files_and_name_a_conflict(tmp_path):
    fs = pafs.LocalFileSystem()
    pq.write_table(pa.table({"prompt": ["a", "b"], "n": pa.array([1, 2], pa.int32())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["c"], "n": pa.array([3], pa.int64())}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"prompt": [7]}), tmp_path / "c.parquet")
    files = [str(tmp_path / n) for n in ("a.parquet", "b.parquet")]
    schema, rows = resume.read_footers(fs, files, "--input x")
    assert rows == 3 and schema.field("n").type == pa.int64()  # widened, as Ray Data reads them
    with pytest.raises(ValueError, match=r"--input x: column 'prompt' is string in .*a.parquet but int64 in "
                                         r".*c.parquet"):
        resume.read_footers(fs, files + [str(tmp_path / "c.parquet")], "--input x")
    # the file named is the one whose type the column has so far, not the first holding it (there: all null)
    pq.write_table(pa.table({"prompt": pa.nulls(1)}), tmp_path / "0.parquet")
    with pytest.raises(ValueError, match=r"'prompt' is string in .*/a.parquet but int64 in .*c.parquet"):
        resume.read_footers(fs, [str(tmp_path / n) for n in ("0.parquet", "a.parquet", "c.parquet")], "--input x")


def test_a_completed_job_leaves_no_temp_files(tmp_path):
    """A worker lost mid-write leaves its temp file while Ray writes the rows again elsewhere: once every write has
    completed, the sink removes it, so the folder holds only whole part files and the summary."""
    from ray.data.datasource import WriteResult

    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    sink = resume.AtomicParquetDatasink(fs, root, "id")
    done = output_table(pa.table({"id": [1, 2]}), [RowResult(generated_text="a", num_generated_tokens=3)] * 2)
    stats = sink.write([done], ctx=None)
    (tmp_path / f"{resume.TEMP_PREFIX}lost-part-y.parquet").write_bytes(b"")  # the lost worker's file, 0 bytes
    sink.on_write_complete(WriteResult(num_rows=2, size_bytes=0, write_returns=[stats]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [resume.part_name(done.column("id"))]
    assert sink.stats["generated_tokens"] == 6


def _part(fs, root, ids, text="x", id_type=None):
    """A part file as the sink writes it (named by its ids)."""
    table = output_table(pa.table({"id": pa.array(ids, id_type)}),
                         [RowResult(generated_text=text, num_generated_tokens=1)] * len(ids))
    resume.AtomicParquetDatasink(fs, root, "id").write([table], ctx=None)


def _ids_once(root) -> list:
    ids = pq.read_table(root).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row is held twice"
    return sorted(ids)


@pytest.mark.parametrize("layout", [
    [[1, 2, 3], [3, 4], [2], [5, 6]],  # a killed run's late writes beside this run's
    [[100], [100, 101, 102], [101, 102]],  # a crash mid-dedupe left a file and its rewrite
    [[300], [301, 302], [300, 301, 302]],  # this run's file holds an earlier run's two
    [[7, 8], [8, 9], [9, 7]],
])
def test_rows_written_twice_are_kept_once(tmp_path, layout):
    """A killed run's last write landing after a quick restart listed the folder: both runs hold those rows. When the
    writes are done, every row is left once, whatever the files' names sort as; a file whose rows are all held
    elsewhere goes; every file is still named by the ids it holds."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    for ids in layout:
        _part(fs, root, ids)
    every = sorted({i for ids in layout for i in ids})
    assert resume.remove_duplicates(fs, root, "id") == sum(map(len, layout)) - len(every)
    assert _ids_once(root) == every
    names = resume.part_files(fs, root)
    for path in names:
        assert path.endswith(resume.part_name(pq.read_table(path).column("id")))
    assert resume.remove_duplicates(fs, root, "id") == 0 and resume.part_files(fs, root) == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(resume.TEMP_PREFIX)]


class _CrashOnDelete(pafs.LocalFileSystem):
    """A local filesystem whose process dies (KeyboardInterrupt) at its nth delete."""

    def __init__(self, nth: int):
        super().__init__()
        self.left = nth

    def delete_file(self, path):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("killed mid-dedupe")
        super().delete_file(path)


def test_duplicates_across_id_types_and_crashes_mid_dedupe(tmp_path):
    """Ids typed int32 in one file and int64 in another still match; a dedupe killed at any delete loses no row,
    and the next run's leaves each once."""
    crashed = 0
    for nth in range(1, 6):
        root = str(tmp_path / str(nth))
        fs = pafs.LocalFileSystem()
        fs.create_dir(root)
        _part(fs, root, [1, 2], id_type=pa.int32())
        _part(fs, root, [2, 2**40], id_type=pa.int64())
        _part(fs, root, [2**40, 5], id_type=pa.int64())
        try:
            resume.remove_duplicates(_CrashOnDelete(nth), root, "id")
        except KeyboardInterrupt:
            crashed += 1
            assert set(pq.read_table(root).column("id").to_pylist()) == {1, 2, 2**40, 5}, nth  # nothing lost
            resume.remove_duplicates(fs, root, "id")
        assert _ids_once(root) == [1, 2, 5, 2**40]
    assert crashed >= 2  # two repeated rows: at least two deletes to crash at


class _CrashMidWrite(pafs.LocalFileSystem):
    """A local filesystem whose process dies (KeyboardInterrupt) part way through writing a file."""

    def open_output_stream(self, path, *args, **kwargs):
        stream = super().open_output_stream(path, *args, **kwargs)

        class Torn:
            def __enter__(self):
                return self

            def write(self, data):
                stream.write(data[: len(data) // 2])
                stream.close()
                raise KeyboardInterrupt("killed mid-write")

            def __exit__(self, *exc):
                stream.close()

        return Torn()


def test_summary_is_never_left_torn(tmp_path):
    """_summary.json was written in place: a kill mid-write left half a JSON document where the last run's
    figures were."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    before = JobSummary(rows=1, rows_failed=0, prompt_tokens=2, generated_tokens=3, wall_time_s=1.0).to_json()
    resume.write_whole(fs, root, resume.SUMMARY_NAME, before)
    with pytest.raises(KeyboardInterrupt):
        resume.write_whole(_CrashMidWrite(), root, resume.SUMMARY_NAME, before.replace("1", "7"))
    assert (tmp_path / resume.SUMMARY_NAME).read_text() == before
    assert resume.remove_temp_files(fs, root) == 1  # the torn temp, removed on the next start


def test_summary_line_and_json():
    s = JobSummary(rows=10, rows_failed=2, prompt_tokens=50, generated_tokens=80, wall_time_s=4.0, rows_skipped=5)
    assert s.line() == ("bulk_generate: 10 rows (2 failed, 5 already written), 50 prompt tokens, "
                        "80 generated tokens, 4.0 s, 20.0 generated tokens/s")
    assert json.loads(s.to_json())["duplicates_removed"] == 0
    assert json.loads(s.to_json())["generated_tokens_per_s"] == 20.0


def _fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        bulk_generate.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_an_error_of_the_run_is_no_argument_error(tmp_path, monkeypatch):
    # a ValueError raised while the job runs (Arrow's, a worker's) keeps its traceback; exit 2 says "bad argument"
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), data)

    def broken_run(plan):
        raise ValueError("an Arrow error while writing")

    monkeypatch.setattr(bulk_generate, "run", broken_run)
    with pytest.raises(ValueError, match="an Arrow error while writing"):
        bulk_generate.main(["--input", str(data), "--output", str(tmp_path / "out")])


def test_bad_job_arguments_fail_before_any_engine_work(tmp_path, capsys):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"], "row": [0]}), data)
    out = str(tmp_path / "out")
    assert "no such file or folder" in _fail(["--input", str(tmp_path / "nope.parquet"), "--output", out], capsys)
    assert "no column 'text' (--prompt-column)" in _fail(
        ["--input", str(data), "--output", out, "--prompt-column", "text"], capsys)
    assert "--id-column 'key'" in _fail(["--input", str(data), "--output", out, "--id-column", "key"], capsys)
    (tmp_path / "model").mkdir()
    err = _fail(["--input", str(data), "--output", out, "--model", str(tmp_path / "model")], capsys)
    assert f"--model {tmp_path / 'model'}: cannot read it" in err
    err = _fail(["--input", str(data), "--output", out, "--tokenizer", str(tmp_path / "model")], capsys)
    assert f"--tokenizer {tmp_path / 'model'}: cannot read its tokenizer" in err  # the model (demo) is fine
    err = _fail(["--input", str(data), "--output", out, "--tokenizer", str(tmp_path / "typo")], capsys)
    assert f"tokenizer '{tmp_path / 'typo'}': no such folder" in err
    assert "is inside --input" in _fail(["--input", str(tmp_path), "--output", str(tmp_path / "o")], capsys)
    # a glob that would read this job's part files on the next run
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "sub" / "x.parquet")
    assert "is inside --input" in _fail(["--input", f"{tmp_path}/*/*.parquet", "--output", out], capsys)
    (tmp_path / "spark").mkdir()
    pq.write_table(pa.table({"user": [1]}), tmp_path / "spark" / "part-00000-1234.snappy.parquet")
    assert "part-00000-1234.snappy.parquet was not written by this job" in _fail(
        ["--input", str(data), "--output", str(tmp_path / "spark")], capsys)
    assert "--concurrency" in _fail(["--input", str(data), "--output", out, "--concurrency", "2,x"], capsys)
    assert not (tmp_path / "out").exists()  # nothing was started, nothing written


def test_a_file_that_is_no_parquet_is_named(tmp_path, capsys):
    """A folder of many files with one that is not Parquet (a copy cut short, a CSV named .parquet): the error was
    Arrow's 'Parquet magic bytes not found in footer' alone, leaving the user to find which of the files it meant."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a"]}), folder / "a.parquet")
    (folder / "b.parquet").write_text("prompt\nhi\n")
    err = _fail(["--input", str(folder), "--output", str(tmp_path / "out")], capsys)
    assert f"--input {folder}: {folder / 'b.parquet'} is not a readable Parquet file" in err
    assert "magic bytes" in err  # Arrow's reason still comes along
    assert not (tmp_path / "out").exists()


def test_id_column_must_be_unique_and_non_null_checked_before_any_work(tmp_path, capsys):
    """Resume and exactly-once match rows by id: repeated or null ids stop the job at planning time."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"], "doc": ["d1", "d2"], "n": [1, None]}), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": ["c", "d"], "doc": ["d3", "d1"], "n": [2, 3]}), folder / "b.parquet")
    out = str(tmp_path / "out")
    err = _fail(["--input", str(folder), "--output", out, "--id-column", "doc"], capsys)
    assert "--id-column 'doc'" in err and "1 id(s) appear more than once, e.g. 'd1' (2 rows)" in err
    err = _fail(["--input", str(folder), "--output", out, "--id-column", "n"], capsys)
    assert "--id-column 'n'" in err and "1 row(s) have a null id (the first is row 1" in err
    pq.write_table(pa.table({"prompt": ["a"], "score": [0.5]}), tmp_path / "f.parquet")
    assert "holds double; ids must be integers or strings" in _fail(
        ["--input", str(tmp_path / "f.parquet"), "--output", out, "--id-column", "score"], capsys)
    assert not (tmp_path / "out").exists()


def test_an_input_row_hash_column_given_as_id_column_is_kept(tmp_path):
    """An input with its own row_hash column is told to pass it as --id-column; the job then still read with
    include_row_hash=True, which overwrites that column with Ray Data's hashes: the output lost the input's ids."""
    import ray

    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "row_hash": ["doc-1", "doc-2"]}), data)
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    plan = bulk_generate.plan_job(parser.parse_args(
        ["--input", str(data), "--output", str(tmp_path / "out"), "--id-column", "row_hash"]))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = bulk_generate.read_input(plan).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["row_hash"] for r in rows) == ["doc-1", "doc-2"]


def test_too_few_cpus_for_the_replicas_is_an_argument_error(tmp_path, capsys):
    """--concurrency beyond a CPU-only cluster: the job stopped with a ValueError traceback (exit 1) after it had made
    the output folder and written _job.json there; it is an argument error like the others, found once Ray is up."""
    import ray

    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), data)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        err = _fail(["--input", str(data), "--output", str(tmp_path / "out"), "--device", "cpu"], capsys)
    finally:
        ray.shutdown()
    assert "1 CPU engine replica(s) x 1.0 CPU + 1 CPU for reading and writing need 2 CPUs; the Ray cluster has 1" in err
    assert not (tmp_path / "out").exists()


def test_resume_with_other_input_or_arguments_is_refused(tmp_path):
    """Rows already in --output are skipped as done: a rerun with other sampling values, another prompt column or a
    rewritten input would silently mix their outputs with the earlier run's (seen: max_tokens 2 and 6 in one folder)."""
    data, out = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.table({"key": [0, 1], "prompt": ["a", "b"], "q": ["c", "d"]}), data)
    argv = ["--input", str(data), "--output", str(out), "--id-column", "key", "--max-tokens", "2"]

    def plan(*extra, base=argv):
        parser = argparse.ArgumentParser()
        bulk_generate.add_arguments(parser)
        return bulk_generate.plan_job(parser.parse_args(base + list(extra)))

    first = plan()
    out.mkdir()
    resume.write_job_record(first.output_fs, first.output_root, first.record)  # what execute() does first
    plan("--max-tokens", "6")  # nothing written yet: nothing to mix with
    sink = resume.AtomicParquetDatasink(first.output_fs, first.output_root, "key")
    sink.write([output_table(pa.table({"key": [0]}), [RowResult(generated_text="x")])], ctx=None)
    plan()  # the same job resumes
    with pytest.raises(ValueError, match=r"sampling_defaults was \{'max_tokens': 2\}, now \{'max_tokens': 6\}"):
        plan("--max-tokens", "6")
    with pytest.raises(ValueError, match="prompt_column was 'prompt', now 'q'"):
        plan("--prompt-column", "q")
    # without --id-column: the parts have no row_hash column, yet they are this job's files
    with pytest.raises(ValueError, match="id_column was 'key', now 'row_hash'"):
        plan(base=argv[:4] + argv[6:])
    pq.write_table(pa.table({"key": [0, 1], "prompt": ["a", "other"], "q": ["c", "d"]}), data)
    with pytest.raises(ValueError, match=f"1 input file.* rewritten, e.g. {data}"):
        plan()


def test_id_check_reads_the_column_as_the_files_unify(tmp_path):
    """The id check read the files with the first one's schema: an empty first file (pandas types its empty column
    null) stopped planning with an Arrow cast traceback, a first file without the column with 'No match for
    FieldRef', and an int32 first file beside a large int64 id with a bare 'not in range'."""
    folder, out = tmp_path / "in", str(tmp_path / "out")
    folder.mkdir()
    empty = pa.table({"prompt": pa.array([], pa.string()), "key": pa.array([], pa.null())})  # pandas: no rows, key null
    pq.write_table(empty, folder / "0.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "key": pa.array([1], pa.int32())}), folder / "1.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "key": pa.array([2**40], pa.int64())}), folder / "2.parquet")
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    argv = ["--input", str(folder), "--output", out, "--id-column", "key"]
    assert bulk_generate.plan_job(parser.parse_args(argv)).input_rows == 2
    pq.write_table(pa.table({"prompt": ["c"]}), folder / "00.parquet")  # sorts first, has no key
    with pytest.raises(ValueError, match=r"--id-column 'key' in .*: 1 row\(s\) have a null id \(the first is row 0"):
        bulk_generate.plan_job(parser.parse_args(argv))


def test_check_ids_accepts_unique_ids_across_chunks():
    resume.check_ids(pa.chunked_array([[3, 1], [2]]), "key", "in.parquet")  # no error
    with pytest.raises(ValueError, match=r"e.g. 3 \(3 rows\)"):
        resume.check_ids(pa.chunked_array([[3, 1], [3, 3]]), "key", "in.parquet")


def test_a_row_the_engine_cannot_take_fails_alone(monkeypatch):
    """The replica's own call, in this process: a row whose request fails to be made with an error that is no
    ValueError (none is known; injected here) gets it in `error`; the batch's other rows are generated. Ray Data does
    not retry an actor's own errors, so raising it would stop the job at that row on every rerun."""
    import asyncio

    from jobs.processor import EngineActor

    actor = EngineActor({"model": str(demo_model_path()), "max_model_len": 128, "num_gpu_blocks_override": 64,
                         "device": "cpu"}, RowSpec(sampling_defaults={"max_tokens": 2, "temperature": 0.0}))
    real = actor.engine.engine.make_request

    def make_request(request_id, prompt, params):
        if prompt == "poison":
            raise RuntimeError("tokenizer crashed")
        return real(request_id, prompt, params)

    monkeypatch.setattr(actor.engine.engine, "make_request", make_request)
    try:
        out = asyncio.run(actor(pa.table({"prompt": ["one", "poison", "two"]}))).to_pylist()
    finally:
        actor.engine.shutdown()
    assert out[1]["error"] == "the engine could not take this row: RuntimeError: tokenizer crashed"
    assert [r["error"] for r in out[::2]] == [None, None] and all(r["num_generated_tokens"] == 2 for r in out[::2])


def test_structured_outputs_by_default_and_by_row():
    """--structured-outputs for every row, a row's `structured_outputs` column (JSON text) instead; the replica's own
    call in this process, outputs checked with Python's re."""
    import asyncio
    import re

    from jobs.processor import EngineActor

    spec = RowSpec(sampling_defaults={"max_tokens": 24, "temperature": 1.0, "seed": 3,
                                      "structured_outputs": {"regex": "[a-c]{2,4}-[0-9]"}})
    actor = EngineActor({"model": str(demo_model_path()), "max_model_len": 128, "num_gpu_blocks_override": 64,
                         "device": "cpu"}, spec)
    batch = pa.table({"prompt": ["one", "two", "three", "four"],
                      "structured_outputs": [None, '{"choice": ["left", "right"]}', "{not json", '{"regex": "(("}']})
    try:
        out = asyncio.run(actor(batch)).to_pylist()
    finally:
        actor.engine.shutdown()
    assert re.fullmatch("[a-c]{2,4}-[0-9]", out[0]["generated_text"]) and out[0]["finish_reason"] == "stop"
    assert out[1]["generated_text"] in ("left", "right") and out[1]["error"] is None
    assert "structured_outputs (column) is not JSON" in out[2]["error"]
    assert "structured_outputs.regex: Regex parsing error" in out[3]["error"]


def test_a_bad_structured_outputs_argument_stops_the_job_before_it_starts(tmp_path):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), data)
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    base = ["--input", str(data), "--output", str(tmp_path / "out")]
    for flag, message in (('{"regex": "(("}', "--structured-outputs: invalid sampling parameter "
                                                "structured_outputs.regex: Regex parsing error"),
                          ('{"jsn": {}}', "unknown key(s) ['jsn']")):
        with pytest.raises(ValueError) as info:
            bulk_generate.plan_job(parser.parse_args(base + ["--structured-outputs", flag]))
        assert message in str(info.value)
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--structured-outputs", "{oops"])
    assert not (tmp_path / "out").exists()


def test_chat_template_kwargs_reach_the_template(tokenizer, tmp_path):
    """--chat-template-kwargs (Qwen3's {"enable_thinking": false}): chat rows render with them; a bad value stops the
    job before it starts; the job record holds them (a resume with others is refused)."""
    messages = [{"role": "user", "content": "Grüße"}]
    spec = RowSpec(prompt_column=None, messages_column="m", chat_template_kwargs={"add_generation_prompt": False})
    (row,) = prepare_rows(pa.table({"m": [messages]}), spec, tokenizer)
    hf = AutoTokenizer.from_pretrained(demo_model_path())
    assert row.prompt == hf.encode(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
                                   add_special_tokens=False)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"m": [messages]}), data)
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    base = ["--input", str(data), "--output", str(tmp_path / "out"), "--messages-column", "m"]
    plan = bulk_generate.plan_job(parser.parse_args(base + ["--chat-template-kwargs", '{"enable_thinking": false}']))
    assert plan.record["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in bulk_generate.plan_job(parser.parse_args(base)).record
    plain = base[:4] + ["--prompt-column", "m"]
    for argv, message in ((base + ["--chat-template-kwargs", "[1]"], "must be a JSON object"),
                          (base + ["--chat-template-kwargs", '{"conversation": 1}'], "other --chat-template-kwargs"),
                          (plain + ["--chat-template-kwargs", '{"a": 1}'], "applies to chat rows: give --messages-column")):
        with pytest.raises(ValueError, match=re.escape(message)):
            bulk_generate.plan_job(parser.parse_args(argv))


def test_a_chat_template_of_ones_own_renders_the_rows_and_is_recorded(tmp_path):
    """--chat-template: chat rows render with it (checked against the text written by hand); its text is in the job
    record, which a resume must match (an edited file is another job); a bad one stops the job before it starts."""
    messages = [{"role": "user", "content": "Hi"}]
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"m": [messages]}), data)
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    base = ["--input", str(data), "--output", str(tmp_path / "out"), "--messages-column", "m"]
    plan = bulk_generate.plan_job(parser.parse_args(base + ["--chat-template", str(template)]))
    assert plan.record["chat_template"] == template.read_text()
    assert plan.processor.engine_args.chat_template == template.read_text()  # the engines' nodes may lack the file
    spec = plan.processor.rows
    tokenizer = Tokenizer(demo_model_path(), str(template))
    (row,) = prepare_rows(pa.table({"m": [messages]}), spec, tokenizer)
    hf = AutoTokenizer.from_pretrained(demo_model_path())
    assert row.prompt == hf.encode("<user>Hi<assistant>", add_special_tokens=False)
    with pytest.raises(ValueError, match=re.escape("--chat-template: chat_template '/no/such.jinja': not a Jinja")):
        bulk_generate.plan_job(parser.parse_args(base + ["--chat-template", "/no/such.jinja"]))


@pytest.mark.parametrize("engine, accelerator_type, expected", [
    ({}, "L4", 1.0),  # an autoscaling cluster has no GPU node yet: the replicas must still ask for one
    ({"tensor_parallel_size": 2}, "L4", 2.0),
    ({"device": "cuda"}, None, 1.0),
    ({"device": "cpu"}, "L4", 0.0),
])
def test_replicas_ask_for_gpus_before_the_cluster_has_any(monkeypatch, engine, accelerator_type, expected):
    import ray

    from adallm_core.config import EngineArgs
    from jobs.processor import Processor, ProcessorConfig

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("decided without asking the cluster"))
    config = ProcessorConfig(engine_args=EngineArgs(**engine), accelerator_type=accelerator_type)
    assert Processor(config).num_gpus() == expected


@pytest.mark.parametrize("flag", ["--num-gpus", "--num-cpus"])
def test_negative_replica_resources_fail_before_ray_starts(tmp_path, capsys, monkeypatch, flag):
    # Ray refused them only once the job ran: a Ray Data traceback after Ray and the read had started.
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), data)
    monkeypatch.setattr(bulk_generate, "run", lambda plan: pytest.fail("the job ran"))
    err = _fail(["--input", str(data), "--output", str(tmp_path / "out"), flag, "-1"], capsys)
    assert f"{flag[2:].replace('-', '_')} must be >= 0, got -1.0" in err


def test_num_gpus_help_says_what_the_replicas_ask_for():
    # --device cpu asks for no GPU even with --accelerator-type or on a GPU cluster, --device cuda for one on any
    # cluster: the help named only --accelerator-type and the cluster's GPUs
    import ray

    from jobs.processor import Processor

    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    (action,) = [a for a in parser._actions if "--num-gpus" in a.option_strings]
    assert "--device cuda" in action.help and "--device cpu" in action.help
    for flags, gpus in [(["--accelerator-type", "L4"], 1), (["--device", "cuda"], 1),
                        (["--device", "cpu", "--accelerator-type", "L4"], 0)]:
        args = parser.parse_args(["--input", "x", "--output", "y", *flags])
        config = bulk_generate.ProcessorConfig(engine_args=bulk_generate.EngineArgs.from_cli_args(args),
                                               accelerator_type=args.accelerator_type)
        assert not ray.is_initialized() and Processor(config).num_gpus() == gpus, flags


def test_a_folder_holding_another_inputs_rows_is_no_finished_job(tmp_path, monkeypatch):
    """A rerun whose every input row is written starts no engine (9affc26); counting the folder's rows against the
    input's is not enough: a folder whose _job.json was deleted to mix jobs (README) holds another input's rows, and
    this input's were skipped, none generated, the summary calling them all already written."""
    import ray

    first, second, out = tmp_path / "first.parquet", tmp_path / "second.parquet", tmp_path / "out"
    pq.write_table(pa.table({"key": [0, 1, 2], "prompt": ["a", "b", "c"]}), first)
    pq.write_table(pa.table({"key": [10, 11], "prompt": ["d", "e"]}), second)
    out.mkdir()
    fs = pafs.LocalFileSystem()
    resume.AtomicParquetDatasink(fs, str(out), "key").write(
        [output_table(pa.table({"key": [0, 1, 2]}), [RowResult(generated_text="x")] * 3)], ctx=None)

    class EngineStarted(Exception):
        pass

    class NoEngine:  # the processor, up to where its engines would start
        def check_cluster(self):
            return 0.0

        def __call__(self, ds):
            raise EngineStarted

    monkeypatch.setattr(bulk_generate, "build_processor", lambda config: NoEngine())
    parser = argparse.ArgumentParser()
    bulk_generate.add_arguments(parser)
    plan = bulk_generate.plan_job(parser.parse_args(
        ["--input", str(second), "--output", str(out), "--id-column", "key", "--device", "cpu"]))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(EngineStarted):  # 3 rows written, 2 to write: none of them is there
            bulk_generate.execute(plan)
        resume.AtomicParquetDatasink(fs, str(out), "key").write(
            [output_table(pa.table({"key": [10, 11]}), [RowResult(generated_text="y")] * 2)], ctx=None)
        summary, ds = bulk_generate.execute(plan)  # now they are: no engine
    finally:
        ray.shutdown()
    assert ds is None and summary.rows == 0 and summary.rows_skipped == 2
