"""Streaming safetensors writer: the header is laid out first from known dtypes and shapes, then each tensor's bytes
are written at their offsets piece by piece, so no whole tensor (let alone a whole shard) is ever held in memory.

File format (https://github.com/huggingface/safetensors): u64 little-endian header size, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} padded with spaces to 8 bytes, then data.
The files written here are read back with safetensors' own loader in the tests.
"""
from __future__ import annotations

import json
import math
import struct

import torch

ST_DTYPE_NAMES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_DTYPES = {v: k for k, v in ST_DTYPE_NAMES.items()}  # "BF16" -> torch.bfloat16


class StreamingSafetensorsWriter:
    """with StreamingSafetensorsWriter(path, {name: (dtype, shape)}) as w: w.write(name, tensor_part, byte_offset)"""

    def __init__(self, path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, (dtype, shape) in specs.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
            self.offsets[name] = (pos, pos + size)
            pos += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.data_start = 8 + len(blob)
        self.nbytes = self.data_start + pos
        self.written: dict[str, int] = dict.fromkeys(specs, 0)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.file.truncate(self.nbytes)

    def write(self, name: str, part: torch.Tensor, byte_offset: int = 0) -> None:
        """Write a contiguous piece of tensor `name`, starting `byte_offset` bytes into that tensor's data."""
        data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        begin, end = self.offsets[name]
        if begin + byte_offset + data.nbytes > end:
            raise ValueError(f"write past the end of tensor {name!r}")
        self.file.seek(self.data_start + begin + byte_offset)
        self.file.write(memoryview(data))  # safetensors data is little-endian, as x86/ARM memory
        self.written[name] += data.nbytes

    def close(self) -> None:
        self.file.close()
        short = [n for n, (b, e) in self.offsets.items() if self.written[n] != e - b]
        if short:
            raise RuntimeError(f"{self.file.name}: tensors not completely written: {short[:5]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.file.close()
