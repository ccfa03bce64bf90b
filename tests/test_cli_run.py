"""`adallm run` and `adallm generate` through the real CLI dispatcher."""
import io
import json
import subprocess
import os
import shutil
import sys

import pytest

from adallm_core.cli import main
from engine_fixtures import tiny_model

ENGINE_FLAGS = ["--kv-cache-dtype", "bf16", "--num-gpu-blocks-override", "64", "--max-model-len", "128"]


def run_cli(argv, stdin_text=""):
    from adallm_core import run_cli

    parser_args = None
    import argparse

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    parser_args = parser.parse_args(argv)
    out = io.StringIO()
    rc = run_cli.main(parser_args, stdin=io.StringIO(stdin_text), stdout=out)
    return rc, out.getvalue()


def reference_text(prompt, max_tokens, chat=False, max_model_len=128):
    from adallm_core import LLM, SamplingParams

    llm = LLM(tiny_model("qwen3"), kv_cache_dtype="bf16", num_gpu_blocks_override=64, max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if chat:
        return [o.outputs[0].text for o in llm.chat(prompt, params, use_tqdm=False)]
    return [o.outputs[0].text for o in llm.generate(prompt, params, use_tqdm=False)]


def test_run_with_a_prompt_streams_the_completion():
    rc, out = run_cli([tiny_model("qwen3"), "Hello there", "--temperature", "0", "--max-tokens", "12",
                       "--ignore-eos", *ENGINE_FLAGS])
    assert rc == 0
    assert out == reference_text(["Hello there"], 12)[0] + "\n"


def test_run_takes_the_prompt_after_options(monkeypatch):
    """`adallm run MODEL --flags PROMPT`: argparse alone matched the optional PROMPT empty beside MODEL and then
    refused the prompt as an unrecognized argument."""
    from adallm_core import run_cli

    parsed = []
    monkeypatch.setattr(run_cli, "main", lambda args: parsed.append(args) or 0)
    assert main(["run", "demo", "--temperature", "0", "--chat", *ENGINE_FLAGS, "Hello there"]) == 0
    assert parsed[0].prompt == "Hello there" and parsed[0].chat and parsed[0].temperature == 0


def test_interactive_chat_keeps_history_and_quits():
    rc, out = run_cli([tiny_model("qwen3"), "--chat", "--temperature", "0", "--max-tokens", "5", "--ignore-eos",
                       *ENGINE_FLAGS], stdin_text="Hi\nHow are you\n\\q\nnever read\n")
    assert rc == 0
    first, second = out.split("\n")[:2]
    conv = [{"role": "user", "content": "Hi"}]
    assert first == reference_text(conv, 5, chat=True)[0]
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you"}]
    assert second == reference_text(conv, 5, chat=True)[0]


def test_run_chat_with_a_model_without_a_chat_template_is_an_error_line(tmp_path, capsys):
    """Not a traceback: one line naming the problem, exit 1, and an interactive session goes on."""
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model("qwen3"), model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rc, out = run_cli([str(model), "Hi", "--chat", *ENGINE_FLAGS])
    assert rc == 1 and out == "" and "has no chat template" in capsys.readouterr().err
    rc, _ = run_cli([str(model), "--chat", *ENGINE_FLAGS], stdin_text="Hi\nAgain\n\\q\n")
    assert rc == 0 and capsys.readouterr().err.count("has no chat template") == 2


def test_run_rejects_bad_sampling_flags(capsys):
    rc, _ = run_cli([tiny_model("qwen3"), "x", "--temperature", "-1", *ENGINE_FLAGS])
    assert rc == 2 and "temperature" in capsys.readouterr().err


def test_generate_writes_jsonl_atomically(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out" / "out.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello", "id": "a"}, {"messages": [{"role": "user", "content": "Hi"}]},
        {"prompt_token_ids": [5, 6, 7]}]) + "\n")
    rc = main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(out), "--temperature", "0",
               "--max-tokens", "4", "--ignore-eos", *ENGINE_FLAGS])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 1, 2]
    assert rows[0]["text"] == reference_text(["Hello"], 4)[0]
    assert all(len(r["token_ids"]) == 4 and r["finish_reason"] == "length" for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]  # no temp file left


def test_generate_takes_messages_as_llm_chat_does(tmp_path, capsys):
    """OpenAI's text parts and an assistant's earlier tool call (content null, arguments as JSON text) were refused
    as "'messages' must be ... strings", though LLM.chat and the server take them; a part no text model reads is
    still named by its line."""
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}
    parts = [{"type": "text", "text": "What time"}, {"type": "text", "text": "is it?"}]
    conversation = [{"role": "user", "content": parts},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "noon"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"messages": conversation}) + "\n")
    rc = main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(out), "--temperature", "0",
               "--max-tokens", "4", "--ignore-eos", *ENGINE_FLAGS, "--max-model-len", "256"])
    want = reference_text(conversation, 4, chat=True, max_model_len=256)[0]
    assert rc == 0 and json.loads(out.read_text())["text"] == want
    inp.write_text('{"prompt": "ok"}\n' + json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}) + "\n")
    assert main(["generate", str(tmp_path / "no-model-needed"), "--input", str(inp), "--output", str(out),
                 *ENGINE_FLAGS]) == 2
    assert "in.jsonl:2: chat: message 0: content part 'image_url' is not supported" in capsys.readouterr().err


def test_generate_bad_input_line_names_the_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    rc = main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
               *ENGINE_FLAGS])
    assert rc == 2 and "in.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("line", ['{"prompt": 5}', '{"prompt_token_ids": "abc"}', '{"prompt": ""}'])
def test_generate_names_the_line_of_a_prompt_the_engine_refuses(tmp_path, capsys, line):
    """By its file line (here 3, after a blank line), not its 0-based place in the batch ('prompt 1')."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    rc = main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
               *ENGINE_FLAGS])
    err = capsys.readouterr().err
    assert rc == 2 and "in.jsonl:3: " in err and "prompt 1" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_run_names_a_model_that_cannot_load(tmp_path, capsys):
    """A missing folder, or a folder that is no checkpoint: one line naming it and exit 1, no traceback."""
    rc, _ = run_cli([str(tmp_path / "no-such-model"), "x", *ENGINE_FLAGS])
    assert rc == 1 and "no-such-model': no such folder" in capsys.readouterr().err
    rc, _ = run_cli([str(tmp_path), "x", *ENGINE_FLAGS])
    assert rc == 1 and f"{tmp_path / 'config.json'}: file not found" in capsys.readouterr().err


@pytest.mark.parametrize(("line", "output", "named"), [
    ('{"prompt": "ok"}', "in.jsonl", "is the input file"),
    ('{"prompt": "ok"}', ".", "is a folder"),
    ('{"prompt": "ok"}', "afile/o.jsonl", "afile"),
    ('{"messages": "hi"}', "o.jsonl", "in.jsonl:1: 'messages' must be a non-empty list of {role, content}"),
    ('{"messages": [{"content": "hi"}]}', "o.jsonl", "in.jsonl:1: 'messages' must be"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "o.jsonl",
     "in.jsonl:1: has 'messages' and 'prompt'; give one of them"),
])
def test_generate_refuses_bad_output_or_messages_before_loading_the_model(tmp_path, capsys, line, output, named):
    (tmp_path / "in.jsonl").write_text(line + "\n")
    (tmp_path / "afile").write_text("a file where a folder would go")
    rc = main(["generate", str(tmp_path / "no-model-needed"), "--input", str(tmp_path / "in.jsonl"),
               "--output", str(tmp_path / output), *ENGINE_FLAGS])
    assert rc == 2 and named in capsys.readouterr().err
    assert (tmp_path / "in.jsonl").read_text() == line + "\n"


def test_ctrl_c_in_generate_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the batch runs: no traceback, the shell's status for it, and no output file."""
    from adallm_core.llm import LLM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "generate", interrupted)
    (tmp_path / "in.jsonl").write_text('{"prompt": "ok"}\n')
    rc = main(["generate", tiny_model("qwen3"), "--input", str(tmp_path / "in.jsonl"), "--output",
               str(tmp_path / "o.jsonl"), *ENGINE_FLAGS])
    assert rc == 130 and capsys.readouterr().err.strip().endswith("adallm generate: interrupted")
    assert not (tmp_path / "o.jsonl").exists()


def test_run_takes_windows_line_ends():
    rc, text = run_cli([tiny_model("qwen3"), "--temperature", "0", "--max-tokens", "4", "--ignore-eos",
                        *ENGINE_FLAGS], stdin_text="Hello\r\n")
    assert rc == 0 and text.strip("\n") == reference_text(["Hello"], 4)[0]


def test_generate_output_has_the_permissions_of_a_plain_file(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    inp.write_text('{"prompt": "Hello"}\n')
    old = os.umask(0o022)
    try:
        assert main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(out), "--max-tokens", "2",
                     *ENGINE_FLAGS]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_adallm_console_script_runs_the_demo_path_help():
    proc = subprocess.run([sys.executable, "-m", "adallm_core.cli", "run", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-tokens" in proc.stdout and "--kv-cache-dtype" in proc.stdout


def test_run_system_without_chat_is_an_error_not_ignored(capsys):
    # Without --chat the prompt goes to the model as it is: the system message would be dropped without a word.
    rc, out = run_cli([tiny_model("qwen3"), "Hello", "--system", "Answer in French.", "--max-tokens", "2",
                       *ENGINE_FLAGS])
    assert rc == 2 and out == ""
    assert "--system applies to --chat" in capsys.readouterr().err


def test_generate_repeated_prompt_gets_different_samples_reproducibly(tmp_path):
    # Sampling one prompt several times (pass@k, self-consistency) is repeating its line: every line seeded with the
    # same --seed gave copies of one sample. Line i takes --seed + i, so a rerun still gives the same file.
    inp = tmp_path / "in.jsonl"
    inp.write_text((json.dumps({"prompt": "Hello"}) + "\n") * 4)
    runs = []
    for out in (tmp_path / "a.jsonl", tmp_path / "b.jsonl"):
        assert main(["generate", tiny_model("qwen3"), "--input", str(inp), "--output", str(out), "--temperature", "1",
                     "--max-tokens", "8", "--ignore-eos", *ENGINE_FLAGS]) == 0
        runs.append([json.loads(line)["token_ids"] for line in out.read_text().splitlines()])
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 4


def test_generate_writes_through_a_symlink_and_into_a_pipe(tmp_path):
    """The atomic write renamed its temporary file over the --output path itself: a symlink (out.jsonl -> a data
    disk) became a plain file, and --output /dev/stdout (a pipe behind a link) was replaced, as root, or failed."""
    import threading

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "Hello", "id": "a"}\n')
    flags = ["--input", str(inp), "--temperature", "0", "--max-tokens", "4", "--ignore-eos", *ENGINE_FLAGS]
    expected = reference_text(["Hello"], 4)[0]
    (tmp_path / "data").mkdir()
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "data" / "out.jsonl")
    assert main(["generate", tiny_model("qwen3"), "--output", str(link), *flags]) == 0
    assert link.is_symlink() and json.loads((tmp_path / "data" / "out.jsonl").read_text())["text"] == expected
    pipe, read = tmp_path / "pipe", []
    os.mkfifo(pipe)
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()), daemon=True)
    reader.start()
    assert main(["generate", tiny_model("qwen3"), "--output", str(pipe), *flags]) == 0
    reader.join(timeout=30)
    assert read and json.loads(read[0])["text"] == expected
    assert not pipe.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.jsonl", "out.jsonl",
                                                                                  "pipe"]


class _CtrlCOnce(io.StringIO):
    """A terminal where the user presses Ctrl-C while the first answer streams (the write is where it lands)."""

    def __init__(self):
        super().__init__()
        self.pressed = False

    def write(self, text):
        if text and not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_chat():
    """Ctrl-C mid-answer ended the session with a traceback (the model loaded again for the next question); it now
    stops that answer, drops the turn, and the next question gets its own answer (not the stopped one's tokens)."""
    from adallm_core import run_cli
    import argparse

    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    args = parser.parse_args([tiny_model("qwen3"), "--chat", "--temperature", "0", "--max-tokens", "5",
                              "--ignore-eos", *ENGINE_FLAGS])
    out = _CtrlCOnce()
    assert run_cli.main(args, stdin=io.StringIO("Hi\nHow are you\n\\q\n"), stdout=out) == 0
    answer = out.getvalue().strip("\n")
    assert answer == reference_text([{"role": "user", "content": "How are you"}], 5, chat=True)[0]


def test_a_chat_that_outgrows_the_context_drops_its_oldest_exchange(capsys):
    """--max-model-len 128: the third question's conversation no longer fits; every later turn failed. The oldest
    exchange now goes, and the answer is the model's on what is left (checked against LLM.chat on that)."""
    from adallm_core.tokenizer import Tokenizer

    questions = ["the quick brown fox jumps over the lazy dog", "a lazy dog sleeps under the brown tree today",
                 "the brown fox runs over the quick lazy dog"]
    a1 = reference_text([{"role": "user", "content": questions[0]}], 5, chat=True)[0]
    two = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": a1},
           {"role": "user", "content": questions[1]}]
    a2 = reference_text(two, 5, chat=True)[0]
    kept = [{"role": "user", "content": questions[1]}, {"role": "assistant", "content": a2},
            {"role": "user", "content": questions[2]}]
    encode = Tokenizer(tiny_model("qwen3")).encode_chat
    assert len(encode(two + kept[1:])) >= 128 > len(encode(kept)) + 5  # the premise: only the shorter one fits
    rc, out = run_cli([tiny_model("qwen3"), "--chat", "--temperature", "0", "--max-tokens", "5", "--ignore-eos",
                       *ENGINE_FLAGS], stdin_text="\n".join(questions) + "\n")
    a3 = reference_text(kept, 5, chat=True)[0]
    assert rc == 0 and out == f"{a1}\n{a2}\n{a3}\n"
    assert capsys.readouterr().err.count("its oldest exchange was dropped") == 1


def test_ctrl_c_inside_a_step_is_taken_after_it(monkeypatch):
    """A real SIGINT that lands in the model's forward pass: the step ends first (cut midway, its bookkeeping would
    be half done), shows its token, then the answer stops and the next question gets its own answer."""
    import argparse
    import signal

    from adallm_core import run_cli
    from adallm_core.runner import ModelRunner

    execute, calls = ModelRunner.execute, []

    def execute_then_ctrl_c(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the first answer's second step: its prompt was prefilled, it decodes
            signal.raise_signal(signal.SIGINT)
        return execute(self, *a, **kw)

    monkeypatch.setattr(ModelRunner, "execute", execute_then_ctrl_c)
    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    args = parser.parse_args([tiny_model("qwen3"), "--chat", "--temperature", "0", "--max-tokens", "5",
                              "--ignore-eos", "--no-async-scheduling", *ENGINE_FLAGS])
    out = io.StringIO()
    assert run_cli.main(args, stdin=io.StringIO("Hi\nHow are you\n\\q\n"), stdout=out) == 0
    first, second = out.getvalue().split("\n")[:2]
    want = reference_text([{"role": "user", "content": "How are you"}], 5, chat=True)[0]
    assert second == want
    # the step the signal landed in ran to its end and showed its token: two of the five
    assert first == reference_text([{"role": "user", "content": "Hi"}], 2, chat=True)[0]


def test_a_second_ctrl_c_in_a_step_quits_at_once(monkeypatch):
    """A step that hangs (a first compile, a wedged device) must not hold the terminal: the second Ctrl-C quits."""
    import argparse
    import signal

    from adallm_core import run_cli
    from adallm_core.runner import ModelRunner

    execute = ModelRunner.execute

    def execute_after_two_ctrl_c(self, *a, **kw):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return execute(self, *a, **kw)

    monkeypatch.setattr(ModelRunner, "execute", execute_after_two_ctrl_c)
    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    args = parser.parse_args([tiny_model("qwen3"), "Hi", "--max-tokens", "5", *ENGINE_FLAGS])
    with pytest.raises(SystemExit) as quit_:
        run_cli.main(args, stdout=io.StringIO())
    assert quit_.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_generate_names_an_input_that_is_not_utf8(tmp_path, capsys):
    """A Latin-1 or UTF-16 file was "error: 'utf-8' codec can't decode byte 0xe9 ...", naming no file."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    rc = main(["generate", str(tmp_path / "no-model-needed"), "--input", str(inp), "--output",
               str(tmp_path / "o.jsonl"), *ENGINE_FLAGS])
    assert rc == 2 and f"{inp}:1: not UTF-8 text (invalid continuation byte at byte 15)" in capsys.readouterr().err
    from adallm_core.generate_cli import read_prompts

    inp.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9"}\n'.encode())  # a BOM was "not JSON"
    assert read_prompts(inp) == [(1, {"prompt": "caf\u00e9"})]


def test_generate_reads_lines_that_hold_unicode_line_separators(tmp_path):
    """JSON Lines end at '\\n' only: U+2028, U+2029 and U+0085 may stand raw in a JSON string (json.dumps with
    ensure_ascii=False writes them so, as generate's own output does), and str.splitlines() cut the line there."""
    from adallm_core.generate_cli import read_prompts

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a\u2028b\u2029c\u0085d"}\n\n{"prompt": "e"}\r\n', encoding="utf-8")
    assert read_prompts(inp) == [(1, {"prompt": "a\u2028b\u2029c\u0085d"}), (3, {"prompt": "e"})]
