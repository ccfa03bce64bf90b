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
