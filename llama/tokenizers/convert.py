"""The tokenizer of a GGUF file or a Hugging Face folder: built in memory (what Llama.build uses)
or written as a Meta folder's tokenizer file (what llama-convert writes), both from one
in-memory form of it (ConvertedTokenizer), so that the two cannot differ.

What each source becomes (the file written is the one to pass as tokenizer_path):

- SentencePiece vocabulary (GGUF `tokenizer.ggml.model` = llama; Llama 2 and kin) -> a
  SentencePiece model rebuilt from the pieces, scores and types; written as `tokenizer.model`.
- Meta's Llama 3 vocabulary (GGUF pre-tokenizer llama-bpe, or a tokenizer.json with Meta's 256
  special tokens) -> Meta's tiktoken tokenizer; written as `tokenizer.model` in Meta's tiktoken
  format, byte for byte Meta's file.
- Any other byte-level BPE vocabulary (GPT-2, StarCoder, SmolLM2, Llama 3 vocabularies whose
  special tokens were renamed) -> a byte-level BPE tokenizer; written as `tokenizer.json` in
  Hugging Face's format, plus a `tokenizer_config.json` beside it holding what the tokenizer.json
  format has no field for: BOS and EOS, whether BOS is added, and the chat template (the ChatML
  format reads its default system prompt from there). `ByteLevelBPETokenizer` and transformers
  both read the pair.
- A Hugging Face folder with a tokenizer.model: that file, read in place; written as a copy.

GGUF metadata is read by llama.checkpoints.gguf_metadata (no `gguf` package needed); rebuilding a
SentencePiece model needs `protobuf`, an optional dependency imported only then.
"""

import base64
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from llama.checkpoints.gguf_metadata import read_gguf_metadata
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.byte_level_bpe import (
    BYTE_ENCODER,
    ByteLevelBPETokenizer,
    read_json,
    read_tokenizer_config,
    token_bytes,
)
from llama.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from llama.tokenizers.tiktoken_tokenizer import TiktokenTokenizer, llama31_special_token_names

_INSTALL_HINT = "pip install -e '.[demo]'"

# GGUF token types (llama.cpp's, which are SentencePiece's numbering).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

LLAMA3_BASE_TOKENS = 128_000
LLAMA3_N_WORDS = 128_256

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_GPT2_PRE = _BYTE_LEVEL
_DIGITS_PRE = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
}
_LLAMA3_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {"Regex": TiktokenTokenizer.pat_str},
            "behavior": "Isolated",
            "invert": False,
        },
        {**_BYTE_LEVEL, "use_regex": False},
    ],
}
# llama.cpp's `tokenizer.ggml.pre` names -> the HF pre-tokenizer they stand for. llama.cpp splits
# smollm, starcoder and refact alike: each digit apart, then GPT-2's regex.
GGUF_PRE_TOKENIZERS: Dict[str, Dict[str, Any]] = {
    "gpt-2": _GPT2_PRE,
    "smollm": _DIGITS_PRE,
    "starcoder": _DIGITS_PRE,
    "refact": _DIGITS_PRE,
    "llama-bpe": _LLAMA3_PRE,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
}


class ConvertedTokenizer(ABC):
    """A converted source's tokenizer, held in memory: `load()` makes the Tokenizer from it and
    `write()` the Meta folder's tokenizer file(s), each from the same data."""

    @abstractmethod
    def load(self) -> Tokenizer:
        """The tokenizer, built without writing any file.

        Raises:
            ValueError: the data make no tokenizer this library can read (the message says why).
        """

    @abstractmethod
    def write(self, out_dir: Path) -> Path:
        """Writes the tokenizer file(s) into `out_dir` (created if missing) and returns the path
        of the file to pass as tokenizer_path; a tokenizer that load() refuses writes nothing."""


@dataclass(frozen=True)
class _SentencePieceModel(ConvertedTokenizer):
    model_proto: bytes  # a serialized SentencePiece ModelProto: what tokenizer.model holds
    source: str

    def load(self) -> Tokenizer:
        return SentencePieceTokenizer.from_model_proto(self.model_proto, self.source)

    def write(self, out_dir: Path) -> Path:
        return _write_bytes(out_dir / "tokenizer.model", self.model_proto)


@dataclass(frozen=True)
class _MetaLlama3Vocab(ConvertedTokenizer):
    tokens: Sequence[bytes]  # the 128,000 BPE tokens, rank = id
    source: str

    def load(self) -> Tokenizer:
        ranks = {token: rank for rank, token in enumerate(self.tokens)}
        return TiktokenTokenizer.from_mergeable_ranks(ranks, self.source)

    def write(self, out_dir: Path) -> Path:
        return _write_bytes(out_dir / "tokenizer.model", meta_tiktoken_file(self.tokens))


@dataclass(frozen=True)
class _ByteLevelVocab(ConvertedTokenizer):
    spec: Mapping[str, Any]  # tokenizer.json
    config: Mapping[str, Any]  # tokenizer_config.json
    source: str
    original: Optional[Path] = None  # the tokenizer.json `spec` was read from, copied as is

    def load(self) -> Tokenizer:
        try:
            return ByteLevelBPETokenizer.from_spec(self.spec, self.config, self.source)
        except ValueError as e:
            raise ValueError(f"{self.source} gives a tokenizer this library cannot read: {e}") from e

    def write(self, out_dir: Path) -> Path:
        self.load()  # leave no file that Tokenizer() would then refuse
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "tokenizer.json"
        if self.original is not None:
            shutil.copyfile(self.original, out)
        else:
            out.write_text(json.dumps(self.spec, ensure_ascii=False), encoding="utf-8")
        config = json.dumps(self.config, ensure_ascii=False, indent=2)
        (out_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")
        return out


@dataclass(frozen=True)
class _TokenizerFile(ConvertedTokenizer):
    path: Path  # a tokenizer file that needs no conversion: read in place, copied to write

    def load(self) -> Tokenizer:
        return Tokenizer(str(self.path))

    def write(self, out_dir: Path) -> Path:
        self.load()  # fails now, naming the file, if it could not be read later
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(self.path, out_dir / self.path.name))


def tokenizer_from_gguf(gguf_path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file, built in memory (see the module docstring for which).

    Raises:
        FileNotFoundError: `gguf_path` is not a file.
        ImportError: protobuf is not installed (needed for a SentencePiece vocabulary).
        ValueError: not a GGUF file, no tokenizer in it, or a tokenizer model / pre-tokenizer
            that is not supported (the message names it and what is).
    """
    return _read_gguf_tokenizer(Path(gguf_path)).load()


def tokenizer_from_hf(hf_dir: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder, built in memory (see the module docstring).

    Raises:
        FileNotFoundError: `hf_dir` has neither tokenizer.model nor tokenizer.json.
        NotADirectoryError: `hf_dir` is not a folder.
        ValueError: the tokenizer file is not one this library can read (the message says why).
    """
    return _read_hf_tokenizer(Path(hf_dir)).load()


def write_tokenizer_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Writes the tokenizer of a GGUF file into `out_dir` (see the module docstring for which
    file) and returns the path of the tokenizer file.

    Raises:
        NotADirectoryError: `out_dir` exists and is not a folder.
        FileNotFoundError, ImportError, ValueError: as tokenizer_from_gguf.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    return _read_gguf_tokenizer(Path(gguf_path)).write(out_dir)


def write_tokenizer_from_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Writes the tokenizer of a Hugging Face model folder into `out_dir` (see the module
    docstring for which file) and returns the path of the tokenizer file.

    Raises:
        NotADirectoryError: `hf_dir` is not a folder, or `out_dir` exists and is not a folder.
        FileNotFoundError, ValueError: as tokenizer_from_hf.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    tokenizer = _read_hf_tokenizer(hf_dir)
    _check_out_dir(out_dir)
    return tokenizer.write(out_dir)


def _read_gguf_tokenizer(gguf_path: Path) -> ConvertedTokenizer:
    """The tokenizer a GGUF file's metadata describe, in memory (errors as tokenizer_from_gguf)."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    vocab = _GgufVocab(gguf_path)
    kind = vocab.get("tokenizer.ggml.model")
    if kind == "llama":
        return _SentencePieceModel(sentencepiece_model_from_gguf(gguf_path, vocab), str(gguf_path))
    if kind != "gpt2":
        raise ValueError(
            f"{gguf_path}: tokenizer.ggml.model {kind!r} is not supported; supported: 'llama' "
            f"(SentencePiece) and 'gpt2' (byte-level BPE)"
        )
    spec, config = _hf_files_from_gguf(vocab)
    return _byte_level(spec, config, str(gguf_path))


def _read_hf_tokenizer(hf_dir: Path) -> ConvertedTokenizer:
    """The tokenizer of a Hugging Face model folder, in memory (errors as tokenizer_from_hf):
    its tokenizer.model if it has one, else its tokenizer.json and tokenizer_config.json."""
    if not hf_dir.is_dir():
        raise NotADirectoryError(f"Hugging Face model folder {hf_dir} is not a folder")
    model_file, json_file = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    if model_file.is_file():
        return _TokenizerFile(model_file)
    if not json_file.is_file():
        raise FileNotFoundError(
            f"{hf_dir} has neither tokenizer.model nor tokenizer.json; pass the folder of a "
            f"Hugging Face model"
        )
    return _byte_level(read_json(json_file), read_tokenizer_config(hf_dir), str(json_file), json_file)


def _byte_level(
    spec: Mapping[str, Any], config: Mapping[str, Any], source: str, original: Optional[Path] = None
) -> ConvertedTokenizer:
    """Meta's tiktoken tokenizer for Meta's Llama 3 vocabulary, else the byte-level BPE one."""
    meta_tokens = _meta_llama3_tokens(spec)
    if meta_tokens is not None:
        return _MetaLlama3Vocab(meta_tokens, source)
    return _ByteLevelVocab(spec, config, source, original)


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def meta_tiktoken_file(tokens: Sequence[bytes]) -> bytes:
    """Meta's tokenizer.model format: one `<base64 token> <rank>` line per token, rank = id;
    the special tokens after the ranks are implied by the reader."""
    return b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens))


def _meta_llama3_tokens(spec: Mapping[str, Any]) -> Optional[List[bytes]]:
    """The 128,000 token byte strings when `spec` (a tokenizer.json) is Meta's Llama 3 vocabulary:
    Llama 3's pre-tokenizer, Meta's special token names (3 or 3.1) at ids 128000-128255, and
    merges in id order, so that tiktoken's ranks (= ids) make the same merges. Else None."""
    if spec.get("pre_tokenizer") != _LLAMA3_PRE and not _same_llama3_split(spec.get("pre_tokenizer")):
        return None
    model = spec.get("model") or {}
    vocab: Dict[str, int] = model.get("vocab") or {}
    added = {a.get("id"): a for a in spec.get("added_tokens") or [] if isinstance(a, dict)}
    if sorted(added) != list(range(LLAMA3_BASE_TOKENS, LLAMA3_N_WORDS)):
        return None
    names31 = llama31_special_token_names(LLAMA3_N_WORDS - LLAMA3_BASE_TOKENS)
    names3 = _llama3_special_token_names()
    for offset, (name31, name3) in enumerate(zip(names31, names3)):
        content = added[LLAMA3_BASE_TOKENS + offset].get("content")
        if content not in (name31, name3):
            return None
    tokens: List[Optional[bytes]] = [None] * LLAMA3_BASE_TOKENS
    for token, i in vocab.items():
        if i < LLAMA3_BASE_TOKENS:
            tokens[i] = token_bytes(token)
    if any(t is None for t in tokens):
        return None
    ranks = {t: i for i, t in enumerate(tokens)}
    last = -1
    for merge in model.get("merges") or []:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged = ranks.get(token_bytes(left + right))  # type: ignore[arg-type]
        if merged is None or merged < last:
            return None
        last = merged
    return tokens  # type: ignore[return-value]


def _same_llama3_split(pre_tokenizer: Any) -> bool:
    """Whether `pre_tokenizer` is Llama 3's Split + ByteLevel, whatever its optional fields."""
    try:
        split, byte_level = pre_tokenizer["pretokenizers"]
        return (
            split["type"] == "Split"
            and split["pattern"] == {"Regex": TiktokenTokenizer.pat_str}
            and split["behavior"] == "Isolated"
            and not split.get("invert")
            and byte_level["type"] == "ByteLevel"
            and byte_level.get("use_regex") is False
            and not byte_level.get("add_prefix_space")
        )
    except (KeyError, TypeError, ValueError):
        return False


def _llama3_special_token_names() -> List[str]:
    """Llama 3.0's names for ids 128000-128255 (3.1 renamed some reserved ones)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>"]
    names += ["<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    return names


# --- GGUF ---


class _GgufVocab:
    """The `tokenizer.*` metadata of a GGUF file."""

    def __init__(self, path: Path):
        self.path = path
        self.fields = read_gguf_metadata(path, prefix="tokenizer.")
        if "tokenizer.ggml.model" not in self.fields:
            raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.model metadata)")

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(f"{self.path} has no {key} metadata")
        return self.fields[key]


def sentencepiece_model_from_gguf(gguf_path: Path, vocab: Optional[_GgufVocab] = None) -> bytes:
    """A serialized SentencePiece ModelProto equal in behaviour to the original tokenizer.model,
    from a GGUF SentencePiece vocabulary (pieces, scores and types): BPE with byte fallback,
    identity normalizer, dummy prefix (unless the file turns it off), no whitespace folding,
    pad -1 as Meta's.

    Raises:
        ImportError: protobuf is not installed.
        ValueError: not a SentencePiece ('llama') vocabulary, or its arrays disagree in length.
    """
    vocab = vocab or _GgufVocab(Path(gguf_path))
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as e:
        raise ImportError(f"writing a SentencePiece model needs protobuf: {_INSTALL_HINT}") from e
    if vocab.require("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{gguf_path} is not a SentencePiece ('llama') vocabulary")
    pieces = vocab.require("tokenizer.ggml.tokens")
    scores = vocab.require("tokenizer.ggml.scores")
    types = vocab.require("tokenizer.ggml.token_type")
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(
            f"{gguf_path} has {len(pieces)} tokens, {len(scores)} scores, {len(types)} types"
        )
    model = sp_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.unk_id = vocab.get("tokenizer.ggml.unknown_token_id", 0)
    trainer.bos_id = vocab.get("tokenizer.ggml.bos_token_id", 1)
    trainer.eos_id = vocab.get("tokenizer.ggml.eos_token_id", 2)
    trainer.pad_id = -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(vocab.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    # GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 6 byte).
    for piece, score, kind in zip(pieces, scores, types):
        model.pieces.add(piece=piece, score=score, type=kind)
    return model.SerializeToString()


def _hf_files_from_gguf(vocab: _GgufVocab) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """tokenizer.json and tokenizer_config.json contents for a GGUF byte-level BPE vocabulary."""
    path = vocab.path
    pre = vocab.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
        )
    tokens: List[str] = vocab.require("tokenizer.ggml.tokens")
    types: List[int] = vocab.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges: List[str] = vocab.require("tokenizer.ggml.merges")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens holds the same token twice")
    # The vocabulary is spelled in the byte alphabet; llama.cpp keeps added tokens as raw text.
    spelled = {
        token if token_bytes(token) is not None
        else "".join(BYTE_ENCODER[b] for b in token.encode("utf-8")): i
        for i, token in enumerate(tokens)
    }
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {**_BYTE_LEVEL, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # llama.cpp looks whole words up first for Llama 3 style vocabularies only.
            "ignore_merges": GGUF_PRE_TOKENIZERS[pre] is _LLAMA3_PRE,
            "vocab": spelled,
            "merges": [merge.split(" ") for merge in merges],
        },
    }
    config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        i = vocab.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    # GGUF byte-level vocabularies add no BOS unless they say so (as HF's GPT-2 tokenizer).
    config["add_bos_token"] = bool(vocab.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(vocab.get("tokenizer.ggml.add_eos_token", False))
    template = vocab.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return spec, config


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output folder {out_dir} exists and is not a folder")
