"""The header of a GGUF file (llama.cpp's format, versions 2 and 3), read directly: the key-value
metadata and the table of tensors.

The `gguf` package's reader turns every element of every array into its own numpy object, which
takes seconds and tens of MB for a vocabulary (SmolLM2's 49k tokens and merges: ~70 MB; Llama 3's
128k tokens and 280k merges, more); the tokenizer needs only these arrays as Python lists, and
the weights only the tensor table, read here in a fraction of that and without the package.

Layout (little-endian): b"GGUF", version u32, tensor count u64, key-value count u64, then each
key as a string (u64 byte length + UTF-8) followed by a u32 value type and the value; an array
is an element type u32, a count u64 and the elements. Then per tensor: its name, the number of
dimensions u32, the dimensions u64 (fastest-varying first), the type u32 and the offset u64 of
its data from the data section, which starts at the next multiple of general.alignment (32).
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Value types -> struct format of one scalar (8: string, 9: array are read apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: dims as GGUF lists them (fastest-varying first), its GGML type id
    and where its bytes start in the file."""

    name: str
    dims: Tuple[int, ...]
    type_id: int
    file_offset: int


@dataclass(frozen=True)
class GGUFHeader:
    metadata: Dict[str, Any]  # keys under the prefix asked for, arrays as lists
    array_lengths: Dict[str, int]  # the length of every array in the metadata, kept or not
    tensors: Dict[str, TensorInfo]


def read_gguf_header(path: Path, prefix: Union[str, Tuple[str, ...]] = "") -> GGUFHeader:
    """The metadata under `prefix` (or any of several; values of other keys are skipped, not decoded) and the tensor
    table of the GGUF file at `path`. Raises as read_gguf_metadata."""
    return _read(Path(path), lambda reader: reader.header(prefix, path))


def read_gguf_metadata(path: Path, prefix: str = "") -> Dict[str, Any]:
    """The metadata of the GGUF file at `path` whose keys start with `prefix`, as Python values
    (arrays as lists).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a GGUF file, an unsupported version, metadata cut short, or text that
            is not UTF-8.
    """
    return _read(Path(path), lambda reader: reader.metadata(prefix, path))


def _read(path: Path, read: Callable[["_Reader"], Any]) -> Any:
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise ValueError(f"{path} is not a GGUF file: {e}") from e
    with data:
        try:
            return read(_Reader(data))
        except struct.error as e:
            raise ValueError(f"{path}: GGUF metadata is cut short or malformed: {e}") from e


class _Reader:
    def __init__(self, data: mmap.mmap):
        self.data = data
        self.offset = 0

    def metadata(self, prefix: str, path: Path) -> Dict[str, Any]:
        self.start(path)
        self.scalar("Q")  # tensor count: the tensors are not read here
        kv_count = self.scalar("Q")
        fields: Dict[str, Any] = {}
        for _ in range(kv_count):
            key = self.string()
            value = self.value(self.scalar("I"))
            if key.startswith(prefix):
                fields[key] = value
        return fields

    def header(self, prefix: Union[str, Tuple[str, ...]], path: Path) -> GGUFHeader:
        self.start(path)
        tensor_count, kv_count = self.scalar("Q"), self.scalar("Q")
        fields: Dict[str, Any] = {}
        lengths: Dict[str, int] = {}
        alignment = 32
        for _ in range(kv_count):
            key = self.string()
            kind = self.scalar("I")
            if kind == ARRAY:
                element, count = self.scalar("I"), self.scalar("Q")
                lengths[key] = count
                if key.startswith(prefix):
                    fields[key] = self.array(element, count)
                else:
                    self.skip_array(element, count)
                continue
            value = self.value(kind)
            if key.startswith(prefix):
                fields[key] = value
            if key == "general.alignment":
                alignment = value
        infos = []
        for _ in range(tensor_count):
            name = self.string()
            dims = tuple(self.scalar("Q") for _ in range(self.scalar("I")))
            infos.append((name, dims, self.scalar("I"), self.scalar("Q")))
        start = -(-self.offset // alignment) * alignment
        tensors = {name: TensorInfo(name, dims, kind, start + offset) for name, dims, kind, offset in infos}
        return GGUFHeader(fields, lengths, tensors)

    def start(self, path: Path) -> None:
        if self.data[:4] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        self.offset = 4
        version = self.scalar("I")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{path} is GGUF version {version}; versions {SUPPORTED_VERSIONS} are supported"
            )

    def skip_array(self, element: int, count: int) -> None:
        if element == STRING:
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                self.offset += 8 + unpack(self.data, self.offset)[0]
            if self.offset > len(self.data):
                raise struct.error("a string array runs past the end of the file")
        elif element == ARRAY:
            for _ in range(count):
                self.skip_array(self.scalar("I"), self.scalar("Q"))
        else:
            self.offset += count * struct.calcsize("<" + self.format_of(element))

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("Q")
        end = self.offset + size
        if end > len(self.data):
            raise struct.error(f"a string of {size} bytes runs past the end of the file")
        text = self.data[self.offset : end].decode("utf-8")
        self.offset = end
        return text

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            element, count = self.scalar("I"), self.scalar("Q")
            return self.array(element, count)
        return self.scalar(self.format_of(kind))

    def array(self, element: int, count: int) -> List[Any]:
        if element == STRING:
            return self.strings(count)
        if element == ARRAY:
            return [self.value(ARRAY) for _ in range(count)]
        fmt = f"<{count}{self.format_of(element)}"
        values = list(struct.unpack_from(fmt, self.data, self.offset))
        self.offset += struct.calcsize(fmt)
        return values

    def strings(self, count: int) -> List[str]:
        # The hot loop of a vocabulary: locals instead of attribute look-ups.
        data, offset = self.data, self.offset
        unpack: Callable[..., Tuple[int]] = struct.Struct("<Q").unpack_from
        out: List[str] = []
        for _ in range(count):
            (size,) = unpack(data, offset)
            offset += 8
            out.append(data[offset : offset + size].decode("utf-8"))
            offset += size
        if offset > len(data):
            raise struct.error("a string array runs past the end of the file")
        self.offset = offset
        return out

    @staticmethod
    def format_of(kind: int) -> str:
        try:
            return _SCALARS[kind]
        except KeyError:
            raise ValueError(f"unknown GGUF value type {kind}") from None
