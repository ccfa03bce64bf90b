"""deployments/reasoning.py: Qwen3's thinking split from its answer, whole or fed in pieces of any size."""
import pytest

from deployments.reasoning import ThinkSplitter

CASES = [
    # (prompt's end, answer, reasoning, content)
    ("<|im_start|>assistant\n", "<think>\nweigh it</think>\n\nIt is 4.", "\nweigh it", "It is 4."),
    ("<|im_start|>assistant\n", "\n<think>a</think>b", "a", "b"),
    ("<|im_start|>assistant\n", "It is 4, no <think> here", "", "It is 4, no <think> here"),  # thinking off
    ("<|im_start|>assistant\n<think>\n", "opened by the template</think>\n\nyes", "opened by the template", "yes"),
    ("<think>\n\n</think>\n\n", "plain answer", "", "plain answer"),  # Qwen3's enable_thinking false
    ("<|im_start|>assistant\n", "<think>cut by max_tokens </thi", "cut by max_tokens </thi", ""),
    ("<|im_start|>assistant\n", "<thin", "", "<thin"),
    ("<|im_start|>assistant\n", "<think></think>", "", ""),
]


@pytest.mark.parametrize("prompt, answer, reasoning, content", CASES)
@pytest.mark.parametrize("piece", [10**6, 1, 2, 3, 7])
def test_split_whole_or_in_pieces(prompt, answer, reasoning, content, piece):
    splitter = ThinkSplitter(prompt)
    parts = [answer[i:i + piece] for i in range(0, len(answer), piece)] or [""]
    got = [splitter.feed(p, final=i == len(parts) - 1) for i, p in enumerate(parts)]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == (reasoning, content)


def test_a_continued_message_long_inside_its_thinking_starts_the_answer_there():
    """continue_final_message on an assistant message that opened <think> many tokens before its end: the answer
    goes on inside the thinking, so its </think> is not content."""
    from types import SimpleNamespace

    from adallm_core.testing import demo_model_path
    from adallm_core.tokenizer import Tokenizer
    from deployments.llm_server import LLMServer

    tokenizer = Tokenizer(demo_model_path())
    server = object.__new__(LLMServer.func_or_class)  # no engine: _prompt_tail reads only the tokenizer
    server.engine = SimpleNamespace(tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "<think>\n" + "Let me add the two numbers one by one. " * 4}]
    options = dict(add_generation_prompt=False, continue_final_message=True)
    prompt = tokenizer.encode_chat(messages, **options)
    assert len(prompt) > 32
    splitter = ThinkSplitter(server._prompt_tail(prompt))
    assert splitter.feed("So 4.</think>\n\nIt is 4.", final=True) == ("So 4.", "It is 4.")


@pytest.mark.parametrize("options", [{}, dict(add_generation_prompt=False, continue_final_message=True)])
def test_a_think_tag_in_an_earlier_message_does_not_open_the_answers_thinking(options):
    """Only the generation prompt (or the continued last message) opens the answer's thinking. A user who writes
    "<think>" (asking the model to use it, or about it) did not: the answer was all sent to reasoning_content."""
    from types import SimpleNamespace

    from adallm_core.testing import demo_model_path
    from adallm_core.tokenizer import Tokenizer
    from deployments.llm_server import LLMServer

    tokenizer = Tokenizer(demo_model_path())
    server = object.__new__(LLMServer.func_or_class)  # no engine: _prompt_tail reads only the tokenizer
    server.engine = SimpleNamespace(tokenizer=tokenizer)
    messages = [{"role": "user", "content": "Put your reasoning in <think> tags. " + "What is 2 + 2? " * 8}]
    if options:
        messages.append({"role": "assistant", "content": "Sure:"})
    splitter = ThinkSplitter(server._prompt_tail(tokenizer.encode_chat(messages, **options)))
    assert splitter.feed(" It is 4.", final=True) == ("", " It is 4.")
