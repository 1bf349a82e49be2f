"""The safetensors format, read and written without the safetensors package.

A file is an 8-byte little-endian header length N, then N bytes of JSON
`{name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the tensors' raw little-endian bytes, back to back; offsets count from the end of the header.

Tensors are read through a copy-on-write memory map: only the pages of the tensors used are read,
and nothing is copied until a tensor is written to.
"""

import json
import mmap
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from llama.args import CheckpointError
from llama.runtime.distributed import itemsize

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# A header is a few hundred bytes per tensor; anything near this is a damaged or foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

TensorSpec = Tuple[torch.dtype, Tuple[int, ...]]


class SafetensorsError(CheckpointError):
    """A safetensors file that cannot be read, or tensors that cannot be written as one."""


class SafetensorsFile:
    """One .safetensors file: its tensor names, dtypes and shapes from the header, tensors on demand.

    Raises SafetensorsError (naming the file) if the header is damaged, a tensor's bytes lie
    outside the file, or a dtype is one this reader does not support (see DTYPES).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._specs: Dict[str, TensorSpec] = {}
        self._offsets: Dict[str, int] = {}
        self._mmap: Optional[mmap.mmap] = None
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path} is {size} bytes, too short for a safetensors file; download it again")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} does not fit in the {size}-byte file; "
                    "it is not a safetensors file, or it is truncated: download it again"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: the header is not valid JSON ({e}); download the file again") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header should be a JSON object, got {type(header).__name__}")
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        ends: Dict[str, int] = {}
        for name, entry in header.items():
            self._specs[name], self._offsets[name], ends[name] = self._parse_entry(name, entry, data_size)
        self._check_disjoint(ends)

    def _check_disjoint(self, ends: Dict[str, int]) -> None:
        """No two tensors share bytes: a crafted header could make one weight silently be another."""
        spans = sorted((self._offsets[name], end, name) for name, end in ends.items() if end > self._offsets[name])
        for (begin_a, end_a, a), (begin_b, end_b, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise SafetensorsError(
                    f"{self.path}: tensors {a!r} (data_offsets [{begin_a}, {end_a}]) and {b!r} ([{begin_b}, {end_b}]) "
                    "overlap; each tensor has bytes of its own in a safetensors file: it is damaged, download it again"
                )

    def _parse_entry(self, name: str, entry: object, data_size: int) -> Tuple[TensorSpec, int, int]:
        """(dtype, shape), begin and end offsets of one header entry, checked against the data size."""
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
            shape = tuple(int(d) for d in shape)
        except (TypeError, KeyError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from e
        if dtype_name not in DTYPES:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has dtype {dtype_name}, which this reader does not support "
                f"(supported: {', '.join(DTYPES)}); convert the file to bf16/fp16/fp32 first"
            )
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * itemsize(dtype)
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ({dtype_name}, shape {list(shape)}, {nbytes} bytes) has data_offsets "
                f"[{begin}, {end}] outside the {data_size} data bytes; the file is damaged or truncated: download it again"
            )
        return (dtype, shape), begin, end

    def keys(self) -> List[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        """(dtype, shape) from the header, without reading the tensor."""
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the file's memory map (copy-on-write: writing to it leaves the file alone)."""
        dtype, shape = self._specs[name]
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._mmap, dtype=dtype, count=numel, offset=self._data_start + self._offsets[name])
        return flat.view(shape)


def load_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped."""
    f = SafetensorsFile(path)
    return {name: f.get(name) for name in f.keys()}


def save_file(tensors: Mapping[str, torch.Tensor], path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors as one safetensors file (metadata: str -> str, stored as `__metadata__`)."""
    write_file(path, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}, tensors.items(), metadata)


def write_file(
    path: Union[str, Path],
    specs: Mapping[str, Tuple[torch.dtype, Sequence[int]]],
    tensors: Iterable[Tuple[str, torch.Tensor]],
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time.

    The header is written first from specs (name -> (dtype, shape)); tensors must then come in
    the same order with those dtypes and shapes, so only one of them needs to be in memory.

    Raises SafetensorsError for an unsupported dtype, non-string metadata, or a tensor that does
    not match its spec (the partly written file is left for the caller to remove).
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"safetensors metadata must map str to str, got {metadata!r}")
    header: Dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    expected: List[Tuple[str, torch.dtype, Tuple[int, ...]]] = []
    for name, (dtype, shape) in specs.items():
        if dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot hold here (supported: {', '.join(DTYPES)})")
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * itemsize(dtype)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        expected.append((name, dtype, shape))
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # as the reference writer does: tensor data starts 8-byte aligned

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        produced = iter(tensors)
        for name, dtype, shape in expected:
            got = next(produced, None)
            if got is None:
                raise SafetensorsError(f"{path}: tensor {name!r} is in the header but was never produced")
            got_name, tensor = got
            if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise SafetensorsError(
                    f"{path}: expected tensor {name!r} {dtype} {list(shape)} next, got {got_name!r} {tensor.dtype} {list(tensor.shape)}"
                )
            f.write(_raw_bytes(tensor))
            del got, tensor  # before the next one is produced: one tensor in memory at a time
        if next(produced, None) is not None:
            raise SafetensorsError(f"{path}: more tensors were produced than the {len(expected)} in the header")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, little-endian as on every machine torch runs on here."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
