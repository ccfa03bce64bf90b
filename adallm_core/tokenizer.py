"""Tokenizer (transformers AutoTokenizer + generation_config.json eos) and the incremental detokenizer."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import jinja2

from adallm_core.checkpoint.files import CheckpointError, generation_eos_ids, read_json

# Files that hold a vocabulary: a folder with none of them gets an empty tokenizer from AutoTokenizer, no error.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# The tokenizer's JSON files that transformers reads, checked one by one when it fails.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "config.json")
# Prompt tokens kept as decoding context, so the first generated token decodes as it would after the prompt.
_CONTEXT_TOKENS = 8


class Tokenizer:
    """The model's tokenizer: encode/decode, chat template, and every eos id the model may emit."""

    def __init__(self, path: str | Path, chat_template: Optional[str] = None):
        """chat_template: a Jinja template, or a file holding one, in place of the tokenizer's (vLLM's
        --chat-template: a base model has none; a fine-tune's may be wrong)."""
        from transformers import AutoTokenizer

        self.path = Path(path)
        _check_vocab_files(self.path)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # JSONDecodeError, KeyError, AttributeError, the Rust tokenizer's Exception: no file
            raise _tokenizer_error(self.path, e) from e
        if chat_template is not None:
            self.hf.chat_template = load_chat_template(chat_template)
        self.eos_token_id: Optional[int] = self.hf.eos_token_id  # the tokenizer's own; eos_token_ids adds the config's
        self.eos_token_ids = self._eos_ids()
        # transformers' decode adds only clean_up_tokenization_spaces on top of the Rust decode
        cleanup = getattr(self.hf, "clean_up_tokenization_spaces", False)
        self._backend = getattr(self.hf, "backend_tokenizer", None) if not cleanup else None
        # AsyncLLM encodes on the callers' thread while its loop thread decodes; the Rust tokenizer raises
        # "Already borrowed" when an encode that resets truncation/padding meets a concurrent call.
        self._lock = threading.Lock()
        self._byte_alphabet = _byte_alphabet(getattr(self.hf, "backend_tokenizer", None))

    @classmethod
    def for_engine(cls, engine_args, model_path: Path) -> "Tokenizer":
        """The tokenizer an engine of these EngineArgs uses: --tokenizer's folder or hub id, else the model's, with
        --chat-template's template."""
        from adallm_core.model_source import resolve_model_path

        path = resolve_model_path(engine_args.tokenizer, what="tokenizer") if engine_args.tokenizer else model_path
        return cls(path, engine_args.chat_template)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = generation_eos_ids(self.path)  # a broken file or field is an error naming it
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))  # unique, in order

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        unicode_text(text)  # the Rust tokenizer's own error for a lone surrogate is a TypeError that names nothing
        with self._lock:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = token_ids if type(token_ids) is list else list(token_ids)
        with self._lock:
            if self._backend is not None:  # the Rust tokenizer directly: the detokenizer calls this twice a token
                return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, which may be part of a character: a byte-level BPE piece read back through its
        byte alphabet, a SentencePiece byte piece (<0xE5>) as that byte, any other token as its text's UTF-8."""
        with self._lock:
            piece = self.hf.convert_ids_to_tokens(int(token_id))
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece or "")
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self._byte_alphabet is not None and piece and all(c in self._byte_alphabet for c in piece):
            return bytes(self._byte_alphabet[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """One token as the OpenAI API shows it in logprobs: its text, or "bytes:\\xe5\\x8f" for a token that is
        part of a character. Decoded alone, every such token reads U+FFFD, so two of them shared one key of a
        completion's top_logprobs and the client got fewer alternatives than it asked for. Special tokens keep their
        text ("<|im_end|>"), as vLLM's logprobs show them: skipped, they all read ""."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return _BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in raw)

    # messages positional-only: a template keyword named "messages" (chat_template_kwargs) reaches the template's
    # rendering, which refuses it as it refuses "conversation" (a ValueError), instead of colliding with this name
    def apply_chat_template(self, messages: list[dict], /, add_generation_prompt: bool = True, **kwargs) -> str:
        if not (self.hf.chat_template or kwargs.get("chat_template")):
            raise ValueError(f"tokenizer at {self.path} has no chat template; give one (--chat-template, "
                             f"LLM(chat_template=...)) or use generate() with a plain prompt")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               **kwargs)
        except jinja2.TemplateError as e:  # the template refused these messages (e.g. roles that do not alternate)
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e
        except TypeError as e:  # a template keyword argument that collides with apply_chat_template's own
            raise ValueError(f"the chat template's arguments (chat_template_kwargs): {e}") from e

    def encode_chat(self, messages: list[dict], /, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template already writes the special tokens (bos): don't add them twice.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def chat_template_options(add_generation_prompt: bool = True, continue_final_message: bool = False,
                          chat_template_kwargs: Optional[dict] = None) -> dict:
    """vLLM's chat options as apply_chat_template's keyword arguments (the template kwargs win, as in vLLM)."""
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):  # {**"text"}: a TypeError
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
              **(chat_template_kwargs or {})}
    kwargs.pop("tokenize", None)  # rendered to text, then encoded once
    if kwargs["add_generation_prompt"] and kwargs["continue_final_message"]:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    if not kwargs["continue_final_message"]:
        del kwargs["continue_final_message"]  # templates that predate the option never see it
    return kwargs


def _check_vocab_files(path: Path) -> None:
    """transformers 5 builds an empty tokenizer (every text encodes to []) for a folder with a config.json but no
    vocabulary, e.g. a checkpoint copied without its tokenizer files: refuse it, naming the folder."""
    if path.is_dir() and not any((path / name).is_file() for name in VOCAB_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (none of {', '.join(VOCAB_FILES)}); copy them from the "
                              f"original model or pass --tokenizer")


def load_chat_template(value: str) -> str:
    """vLLM's rule: a file of that name is read; else text holding '{', '}' or a newline is the template itself (one
    of comments and text only has no '{{' or '{%'). The template is parsed here, so a broken one fails at start-up,
    not at the first chat request."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"chat_template must be a Jinja template or the path of a file holding one, got {value!r}")
    try:
        value = Path(value).expanduser().read_text()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the text, which no path holds
        if not any(mark in value for mark in "{}\n"):
            raise ValueError(f"chat_template {value!r}: not a Jinja template, and the file cannot be read "
                             f"({getattr(e, 'strerror', e)})") from None
    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return value


def _tokenizer_error(path: Path, error: Exception) -> CheckpointError:
    """transformers' error for a corrupt tokenizer file (a truncated download) names no file: find the one that is
    no JSON object (read_json raises naming it), else name the folder."""
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json(path / name)
    return CheckpointError(f"{path}: the tokenizer files cannot be loaded ({type(error).__name__}: {error})")


def unicode_text(text: str) -> str:
    """The text, or a ValueError when it holds a lone surrogate (JSON's "\ud800" escapes parse to one), which no UTF-8
    tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at index {e.start}")
    return text


def check_conversation(messages) -> None:
    """A conversation as chat templates take it: a non-empty list of {role, content} strings. A ValueError names
    the first message that is not one."""
    shape = "'messages' must be a non-empty list of {role, content} strings"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{shape}, got {messages!r}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise ValueError(f"{shape}: message {j} needs string 'role' and 'content', got {message!r}")


_BYTES_PREFIX = "bytes:"


def bytes_of_token_text(text: str) -> bytes:
    """The bytes of a token as Tokenizer.token_text spells it (the OpenAI API's bytes field)."""
    if text.startswith(_BYTES_PREFIX):
        return bytes.fromhex(text[len(_BYTES_PREFIX):].replace("\\x", ""))
    return text.encode()


def _byte_alphabet(backend) -> Optional[dict[str, int]]:
    """Byte-level BPE (Qwen3's tokenizers) spells each byte as one printable character: that map, reversed; None
    for other tokenizers."""
    decoder = getattr(backend, "decoder", None)
    if decoder is None or "ByteLevel" not in repr(decoder):
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class IncrementalDetokenizer:
    """Text of one sequence, token by token. Never emits half a multi-byte character, finds stop strings across
    token boundaries, and holds back text that could still become the start of a stop string.

    Each step decodes a short window of tokens twice, from prefix_offset to read_offset (already shown) and to
    the end; the difference is the new text (vLLM's scheme). Decoding both from the same token makes
    start-of-text rules (leading-space stripping) cancel out. A window whose text ends in U+FFFD is waiting for
    the rest of a character and is not shown yet; bytes that can never form a character (a model's stray byte)
    are shown as U+FFFD once more text follows, so the stream never stalls.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop  # the text keeps the stop string it ends with (nothing is held back)
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])  # context + generated tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = list(stop)
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.stop_string: Optional[str] = None

    def _decode_window(self) -> tuple[str, str]:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        return (decode(self.ids[self.prefix_offset:self.read_offset], skip),
                decode(self.ids[self.prefix_offset:], skip))

    def _next_piece(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix, full = self._decode_window()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def update(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add one token; returns the stop string if this token completed one (the text then ends before it).
        check_stop=False (at most min_tokens generated, vLLM's rule): stop strings are not looked for yet."""
        if self.stop_string is not None:  # finished: later tokens are not part of the text
            return self.stop_string
        return self._add(self._next_piece(token_id), check_stop)

    def flush(self, check_stop: bool = True) -> Optional[str]:
        """The sequence ended: show what was held back for a character that will never complete (as U+FFFD,
        the way a full decode shows it). check_stop as in update()."""
        if self.stop_string is not None or self.read_offset == len(self.ids):
            return self.stop_string
        prefix, full = self._decode_window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._add(full[len(prefix):], check_stop)

    def _add(self, piece: str, check_stop: bool) -> Optional[str]:
        if not piece:
            return None
        before = len(self.text)
        self.text += piece
        # a match must end in the new piece: text from before min_tokens (check_stop off) is never searched again
        hits = [(i, s) for s in self.stop if check_stop and (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            index, self.stop_string = min(hits)
            self.text = self.text[:index + (len(self.stop_string) if self.include_stop else 0)]
        return self.stop_string

    def output_text(self, finished: bool) -> str:
        """Text safe to show: while running, without a tail that is a proper prefix of a stop string."""
        if finished or not self.stop or self.include_stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]
