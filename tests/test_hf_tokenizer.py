"""Byte-level BPE tokenizers from tokenizer.json, and the tokenizer files written from GGUF and
Hugging Face folders: ids equal to transformers' and to the original tokenizers' recorded ids."""

import builtins
import io
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from assets import read_vocab_vectors
from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from llama.checkpoints.gguf_metadata import read_gguf_metadata
from llama.checkpoints.source import CheckpointSource, open_tokenizer
from llama.decoding.stream import IncrementalDecoder
from llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from llama.tokenizers.byte_level_bpe import ByteLevelBPETokenizer
from llama.tokenizers.convert import (
    tokenizer_from_gguf,
    tokenizer_from_hf,
    write_tokenizer_from_gguf,
    write_tokenizer_from_hf,
)

TRICKY_TEXTS = [
    "Hello, world! It's 3.14 o'clock.",
    "  padded  ",
    "a  b   c\t\t\td\n\n\ne \r\n f",
    " \t\n ",
    "",
    "x\n\n2024 and   1 2  3   45678 9",  # whitespace before digits: SmolLM2 splits digits first
    "I'm they're we've you'll he'd IT'S DON'T",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어",
    "нещо на Български កាន់តែពិសេស",
    "🦙 🚀 ✅ 😁 👩‍👩‍👧‍👦 🏳️‍🌈",
    "e\u0301 n\u0303 Cu\u031b\u0309a Việt",
    "\x00nul \x07bell \x7fdel \x1c\x1e\x1f \x85 \xa0 \u2028 \u3000 \ufeff",
    'def f(x):\n\treturn {"a": [x, x**2]}  # ok\n',
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <repo_name> <|im_start|",
    "!!!!!!!! ........ ---- ==== ____ \n\n\n\n    \n",
]
# Bytes SmolLM2 has no token for (\x04, \x1d, the lead byte of U+40000...): HF drops them, so
# these texts do not round-trip.
LOSSY_TEXTS = [
    "\x04", "a\x04b", "!\x04!", "!!\x04!! \x13\x14", "a \x1d b", "x\U00040001y", "<|im_end|>\x06"
]
CHATML_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


@pytest.fixture(scope="module")
def corpus(vocab_gguf):
    """The tricky texts and the texts of llama.cpp's tokenizer tests."""
    return TRICKY_TEXTS + LOSSY_TEXTS + [text for text, _ in read_vocab_vectors(vocab_gguf("llama-bpe"))]


@pytest.fixture(scope="module")
def hf_engine(smollm2_tokenizer_json):
    """The `tokenizers` library on our written tokenizer.json: HF's BPE on the same file."""
    return HFTokenizer.from_file(str(smollm2_tokenizer_json))


def ours(tokenizer, text, **kwargs):
    return tokenizer.encode(text, bos=False, eos=False, **kwargs)


def ours_hf_style(tokenizer, text):
    """Our ids with special-token text read as special tokens, as HF reads it by default."""
    return ours(tokenizer, text, allowed_special="all")


def hf_ids(hf_tokenizer, text):
    return hf_tokenizer.encode(text, add_special_tokens=False).ids


# SmolLM2: ids and special tokens from the GGUF


def test_smollm2_ids_follow_its_gguf_metadata(smollm2_tokenizer):
    assert smollm2_tokenizer.n_words == 49152
    assert smollm2_tokenizer.eos_id == 2  # <|im_end|>: tokenizer.ggml.eos_token_id
    # tokenizer.ggml.add_bos_token is false: SmolLM2 prompts start with no BOS
    assert (smollm2_tokenizer.bos_id, smollm2_tokenizer.pad_id) == (-1, -1)


def test_smollm2_special_tokens_are_its_control_tokens(smollm2_tokenizer):
    assert len(smollm2_tokenizer.special_tokens) == 17
    assert CHATML_SPECIALS.items() <= smollm2_tokenizer.special_tokens.items()
    assert smollm2_tokenizer.special_tokens["<empty_output>"] == 16


def test_smollm2_stops_at_im_end_and_endoftext(smollm2_tokenizer):
    assert smollm2_tokenizer.stop_tokens == {2, 0}


def test_smollm2_family_is_chatml(smollm2_tokenizer):
    assert smollm2_tokenizer.family == "chatml"
    assert "<|im_start|>" in smollm2_tokenizer.chat_template


def test_bos_flag_adds_nothing_when_the_tokenizer_adds_no_bos(smollm2_tokenizer):
    assert ours(smollm2_tokenizer, "Hi") == smollm2_tokenizer.encode("Hi", bos=True, eos=False)


# SmolLM2: encoding as transformers and the original tokenizer


def test_smollm2_encodes_as_transformers_from_the_same_gguf(
    smollm2_tokenizer, smollm2_transformers_tokenizer, corpus
):
    # transformers matches special-token text as the special token: allowed_special="all".
    theirs = [smollm2_transformers_tokenizer(t, add_special_tokens=False)["input_ids"] for t in corpus]
    mismatches = [t for t, ids in zip(corpus, theirs) if ours_hf_style(smollm2_tokenizer, t) != ids]
    assert mismatches == []


def test_smollm2_special_token_text_is_plain_text_by_default(smollm2_tokenizer, hf_engine, corpus):
    hf_engine_split = HFTokenizer.from_str(hf_engine.to_str())
    hf_engine_split.encode_special_tokens = True  # HF's switch for special-token text as text
    mismatches = [t for t in corpus if ours(smollm2_tokenizer, t) != hf_ids(hf_engine_split, t)]
    assert mismatches == []
    ids = ours(smollm2_tokenizer, "<|im_end|>")
    assert not set(ids) & set(smollm2_tokenizer.special_tokens.values())
    assert smollm2_tokenizer.decode(ids) == "<|im_end|>"


def test_special_token_text_gives_its_id_when_allowed(smollm2_tokenizer):
    expected = ours(smollm2_tokenizer, "hi") + [2]
    for allowed in ("all", {"<|im_end|>"}):
        assert ours(smollm2_tokenizer, "hi<|im_end|>", allowed_special=allowed) == expected, allowed


def test_disallowed_special_token_text_raises(smollm2_tokenizer):
    with pytest.raises(ValueError, match="disallowed special token"):
        ours(smollm2_tokenizer, "<|im_end|>", disallowed_special="all")


def test_tokens_reachable_by_several_merge_paths_encode_as_hf(smollm2_tokenizer, hf_engine):
    # tiktoken merges by the rank of the merged bytes, HF by the rank of the merged pair: texts
    # glued from random tokens put many alternative splits of one token side by side.
    texts = [smollm2_tokenizer.decode([i]) for i in range(smollm2_tokenizer.n_words)]
    rng = random.Random(0)
    glued = ["".join(rng.choices(texts, k=rng.randint(2, 4))) for _ in range(20_000)]
    samples = texts + [" " + t for t in texts] + glued
    theirs = [e.ids for e in hf_engine.encode_batch(samples, add_special_tokens=False)]
    mismatches = [t for t, ids in zip(samples, theirs) if ours_hf_style(smollm2_tokenizer, t) != ids]
    assert mismatches == []


@pytest.mark.parametrize("text", LOSSY_TEXTS)
def test_bytes_missing_from_the_vocabulary_are_dropped_as_hf_does(smollm2_tokenizer, hf_engine, text):
    # HF drops them and merges across the gap ("!\x04!" is one token "!!").
    assert ours_hf_style(smollm2_tokenizer, text) == hf_ids(hf_engine, text)


def test_decode_equals_transformers(smollm2_tokenizer, smollm2_transformers_tokenizer, corpus):
    for text in corpus:
        ids = ours_hf_style(smollm2_tokenizer, text)
        assert smollm2_tokenizer.decode(ids) == smollm2_transformers_tokenizer.decode(ids), text


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encode_decode_round_trips(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(ours(smollm2_tokenizer, text)) == text


def test_decode_of_a_split_character_ends_in_replacement_char(smollm2_tokenizer):
    ids = ours(smollm2_tokenizer, "🦙")
    assert len(ids) > 1  # the llama emoji is no token: its 4 bytes come in pieces
    assert smollm2_tokenizer.decode(ids[:-1]).endswith("\ufffd")


def test_streaming_decoder_emits_whole_characters(smollm2_tokenizer):
    text = "日本語 🦙🚀 naïve"
    decoder = IncrementalDecoder(smollm2_tokenizer)
    pieces = [decoder.push(token) for token in ours(smollm2_tokenizer, text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_decode_rejects_ids_outside_the_vocabulary(smollm2_tokenizer):
    for bad in (-1, 49152):
        with pytest.raises(ValueError, match=f"token id {bad} is not in this vocabulary"):
            smollm2_tokenizer.decode([5, bad])


def test_million_char_runs_encode_in_seconds(smollm2_tokenizer):
    # tiktoken's regex overflows its stack on such runs unless they are cut, as Meta cuts them.
    for char in ("a", " ", "7"):
        text = char * 1_000_000
        start = time.perf_counter()
        ids = ours(smollm2_tokenizer, text)
        assert time.perf_counter() - start < 10
        assert smollm2_tokenizer.decode(ids) == text


# Other byte-level vocabularies: the original tokenizers' recorded ids


@pytest.mark.parametrize("kind, family", [("gpt-2", "bpe"), ("starcoder", "bpe")])
def test_byte_level_vocab_reproduces_llama_cpp_reference_vectors(tmp_path, vocab_gguf, kind, family):
    # GPT-2: GPT-2's regex; StarCoder: digits split first, as SmolLM2 (llama.cpp treats both alike).
    path = write_tokenizer_from_gguf(vocab_gguf(kind), tmp_path)
    tokenizer = Tokenizer(str(path))
    assert (type(tokenizer), tokenizer.family) == (ByteLevelBPETokenizer, family)
    vectors = read_vocab_vectors(vocab_gguf(kind))
    assert len(vectors) == 46
    assert [(t, ids) for t, ids in vectors if ours(tokenizer, t) != ids] == []


def test_gpt2_vocab_stops_at_endoftext(tmp_path, vocab_gguf):
    tokenizer = Tokenizer(str(write_tokenizer_from_gguf(vocab_gguf("gpt-2"), tmp_path)))
    assert (tokenizer.eos_id, tokenizer.stop_tokens, tokenizer.bos_id) == (50256, {50256}, -1)


# Files written from GGUF


def test_gguf_byte_level_vocab_becomes_tokenizer_json_and_config(smollm2_tokenizer_json):
    assert smollm2_tokenizer_json.name == "tokenizer.json"
    config = json.loads((smollm2_tokenizer_json.parent / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["add_bos_token"] is False
    assert "You are a helpful AI assistant named SmolLM" in config["chat_template"]


def test_written_tokenizer_json_encodes_the_same_in_transformers(
    smollm2_tokenizer_json, smollm2_tokenizer, corpus
):
    from transformers import PreTrainedTokenizerFast

    theirs = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer_json))
    for text in corpus:
        ids = ours_hf_style(smollm2_tokenizer, text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text


def test_written_folder_loads_in_transformers_with_eos_and_chat_template(
    smollm2_tokenizer_json, smollm2_gguf_path
):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(smollm2_tokenizer_json.parent)
    assert (theirs.eos_token, theirs.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert theirs.chat_template == read_gguf_metadata(smollm2_gguf_path)["tokenizer.chat_template"]


def test_llama3_gguf_becomes_metas_tokenizer_model(tmp_path, vocab_gguf, llama3_tokenizer_path):
    path = write_tokenizer_from_gguf(vocab_gguf("llama-bpe"), tmp_path)
    assert path == tmp_path / "tokenizer.model"
    assert path.read_bytes() == llama3_tokenizer_path.read_bytes()


def test_llama3_gguf_tokenizer_model_reproduces_llama_cpp_reference_vectors(
    tmp_path, vocab_gguf, llama3_vocab_vectors
):
    tokenizer = Tokenizer(str(write_tokenizer_from_gguf(vocab_gguf("llama-bpe"), tmp_path)))
    assert type(tokenizer) is TiktokenTokenizer
    assert [(t, ids) for t, ids in llama3_vocab_vectors if ours(tokenizer, t) != ids] == []


def test_sentencepiece_gguf_becomes_a_llama2_tokenizer_model(
    tmp_path, vocab_gguf, llama2_vocab_vectors, llama2_tokenizer
):
    path = write_tokenizer_from_gguf(vocab_gguf("llama-spm"), tmp_path)
    tokenizer = Tokenizer(str(path))
    assert (path.name, type(tokenizer)) == ("tokenizer.model", SentencePieceTokenizer)
    assert [(t, ids) for t, ids in llama2_vocab_vectors if ours(tokenizer, t) != ids] == []
    for text in TRICKY_TEXTS:
        assert ours(tokenizer, text) == ours(llama2_tokenizer, text)


def write_gguf(path: Path, **metadata) -> Path:
    """A GGUF holding only `metadata` (keys with dots given with underscores: tokenizer_ggml_pre)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in metadata.items():
        name = key.replace("_ggml_", ".ggml.").replace("tokenizer_", "tokenizer.", 1)
        writer.add_array(name, value) if isinstance(value, list) else writer.add_string(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_gguf_with_unsupported_pre_tokenizer_is_rejected(tmp_path):
    path = write_gguf(
        tmp_path / "qwen.gguf",
        tokenizer_ggml_model="gpt2",
        tokenizer_ggml_pre="qwen2",
        tokenizer_ggml_tokens=["a", "b", "ab"],
        tokenizer_ggml_merges=["a b"],
    )
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2' is not supported; supported:"):
        write_tokenizer_from_gguf(path, tmp_path / "out")


def test_gguf_with_unsupported_tokenizer_model_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", tokenizer_ggml_model="bert", tokenizer_ggml_tokens=["a"])
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert' is not supported"):
        write_tokenizer_from_gguf(path, tmp_path / "out")


def test_file_that_is_not_gguf_is_rejected(tmp_path, llama3_tokenizer_path):
    with pytest.raises(ValueError, match="is not a GGUF file"):
        write_tokenizer_from_gguf(llama3_tokenizer_path, tmp_path)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nothing.gguf"):
        write_tokenizer_from_gguf(tmp_path / "nothing.gguf", tmp_path / "out")


def test_gguf_metadata_equals_the_gguf_package_reading(vocab_gguf):
    import gguf

    path = vocab_gguf("gpt-2")
    fields = gguf.GGUFReader(path).fields.items()
    theirs = {k: f.contents() for k, f in fields if not k.startswith("GGUF.")}  # GGUF.*: the header
    assert read_gguf_metadata(path) == theirs


# Files written from Hugging Face folders


@pytest.fixture(scope="module")
def llama3_hf_folder(tmp_path_factory, vocab_gguf):
    """A Hugging Face folder for Llama 3's vocabulary, tokenizer.json as the `tokenizers`
    library writes it (from llama.cpp's vocab file)."""
    meta = read_gguf_metadata(vocab_gguf("llama-bpe"), prefix="tokenizer.")
    tokens = meta["tokenizer.ggml.tokens"]
    hf = HFTokenizer(
        BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]],
            ignore_merges=True,
        )
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(TiktokenTokenizer.pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(tokens[128000:])
    folder = tmp_path_factory.mktemp("Meta-Llama-3-hf")
    hf.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_hf_llama3_folder_becomes_metas_tokenizer_model(
    tmp_path, llama3_hf_folder, llama3_tokenizer_path
):
    path = write_tokenizer_from_hf(llama3_hf_folder, tmp_path)
    assert path.read_bytes() == llama3_tokenizer_path.read_bytes()


def test_hf_llama3_folder_with_chatml_tokens_becomes_tokenizer_json(
    tmp_path, llama3_hf_folder, llama3_vocab_vectors
):
    # Fine-tunes such as Hermes 3 rename reserved tokens to ChatML's: no longer Meta's vocabulary.
    spec = json.loads((llama3_hf_folder / "tokenizer.json").read_text())
    renames = {
        "<|reserved_special_token_0|>": "<|im_start|>",
        "<|reserved_special_token_1|>": "<|im_end|>",
    }
    for added in spec["added_tokens"]:
        added["content"] = renames.get(added["content"], added["content"])
    vocab = spec["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    folder = tmp_path / "hermes"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    tokenizer = Tokenizer(str(write_tokenizer_from_hf(folder, tmp_path / "out")))
    assert (tokenizer.family, tokenizer.bos_id, tokenizer.eos_id) == ("chatml", 128000, 128003)
    assert [(t, ids) for t, ids in llama3_vocab_vectors if ours(tokenizer, t) != ids] == []


def test_hf_folder_with_tokenizer_model_copies_it(tmp_path, llama2_tokenizer_path):
    folder = tmp_path / "llama-2-hf"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(llama2_tokenizer_path.read_bytes())
    (folder / "tokenizer.json").write_text("{}")  # the SentencePiece file wins
    path = write_tokenizer_from_hf(folder, tmp_path / "out")
    assert path.read_bytes() == llama2_tokenizer_path.read_bytes()


def test_hf_folder_without_tokenizer_files_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        write_tokenizer_from_hf(tmp_path, tmp_path / "out")


def test_hf_folder_with_unsupported_tokenizer_json_writes_nothing(tmp_path):
    folder, out = tmp_path / "bert", tmp_path / "out"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="model type 'WordPiece'"):
        write_tokenizer_from_hf(folder, out)
    assert not out.exists() or not any(out.iterdir())


# Tokenizers built in memory: what Llama.build uses for a GGUF file or a Hugging Face folder

SMOLLM2_JINJA = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def smollm2_hf_folder(tmp_path_factory, smollm2_tokenizer_json):
    """A Hugging Face folder with SmolLM2's tokenizer.json and tokenizer_config.json, and a
    chat_template.jinja as newer folders keep it."""
    folder = tmp_path_factory.mktemp("SmolLM2-hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_tokenizer_json.parent / name, folder / name)
    (folder / "chat_template.jinja").write_text(SMOLLM2_JINJA)
    return folder


@pytest.fixture(scope="module")
def llama2_hf_folder(tmp_path_factory, llama2_tokenizer_path):
    folder = tmp_path_factory.mktemp("Llama-2-hf")
    shutil.copyfile(llama2_tokenizer_path, folder / "tokenizer.model")
    return folder


CONVERTED_SOURCES = {
    "gguf-sentencepiece": lambda get: get("vocab_gguf")("llama-spm"),
    "gguf-llama3": lambda get: get("vocab_gguf")("llama-bpe"),
    "gguf-byte-level": lambda get: get("smollm2_gguf_path"),
    "hf-tokenizer-model": lambda get: get("llama2_hf_folder"),
    "hf-llama3": lambda get: get("llama3_hf_folder"),
    "hf-byte-level": lambda get: get("smollm2_hf_folder"),
}


@pytest.fixture(params=sorted(CONVERTED_SOURCES))
def converted_source(request) -> Path:
    """A GGUF file or a Hugging Face folder, one of each kind of tokenizer they convert to."""
    return CONVERTED_SOURCES[request.param](request.getfixturevalue)


@pytest.fixture
def no_file_written(monkeypatch, tmp_path):
    """Fails any opening of a file for writing, and points temporary folders at an empty one."""
    real_open = io.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            raise AssertionError(f"{file} opened for writing (mode {mode!r})")
        return real_open(file, mode, *args, **kwargs)

    empty = tmp_path / "tmp"
    empty.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(empty))
    monkeypatch.setattr(io, "open", read_only_open)
    monkeypatch.setattr(builtins, "open", read_only_open)
    yield
    monkeypatch.undo()
    assert list(empty.iterdir()) == []


def in_memory(source: Path) -> Tokenizer:
    return tokenizer_from_gguf(source) if source.is_file() else tokenizer_from_hf(source)


def written(source: Path, out_dir: Path) -> Tokenizer:
    write = write_tokenizer_from_gguf if source.is_file() else write_tokenizer_from_hf
    return Tokenizer(str(write(source, out_dir)))


def test_opening_a_converted_sources_tokenizer_writes_no_file(converted_source, no_file_written):
    source = CheckpointSource(converted_source, params={}, tensors={})
    tokenizer = open_tokenizer(source, tokenizer_path=None)
    assert tokenizer.encode("Hello", bos=False, eos=False)


def test_in_memory_tokenizer_has_the_attributes_of_the_written_one(converted_source, tmp_path):
    ours, theirs = in_memory(converted_source), written(converted_source, tmp_path)
    assert type(ours) is type(theirs)
    for name in ("family", "n_words", "bos_id", "eos_id", "pad_id", "stop_tokens", "special_tokens"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert getattr(ours, "chat_template", None) == getattr(theirs, "chat_template", None)


def test_in_memory_tokenizer_encodes_and_decodes_as_the_written_one(converted_source, tmp_path):
    ours, theirs = in_memory(converted_source), written(converted_source, tmp_path)
    # SentencePiece has no special-token text; the BPE tokenizers read it as text or, allowed, as ids.
    options = [{}] if isinstance(ours, SentencePieceTokenizer) else [{}, {"allowed_special": "all"}]
    texts = TRICKY_TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]
    for text in texts:
        for kwargs in options:
            ids = ours.encode(text, bos=True, eos=True, **kwargs)
            assert ids == theirs.encode(text, bos=True, eos=True, **kwargs), (text, kwargs)
            assert ours.decode(ids) == theirs.decode(ids), text


def test_hf_folders_chat_template_jinja_is_the_template_in_memory_and_written(smollm2_hf_folder, tmp_path):
    assert in_memory(smollm2_hf_folder).chat_template == SMOLLM2_JINJA
    assert written(smollm2_hf_folder, tmp_path).chat_template == SMOLLM2_JINJA


# Unsupported tokenizer.json forms fail with the field and value


def tokenizer_json(tmp_path, **changes):
    spec = {
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
    }
    spec.update(changes)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def test_minimal_tokenizer_json_loads(tmp_path):
    endoftext = {"id": 3, "content": "<|endoftext|>", "special": True}
    path = tokenizer_json(tmp_path, added_tokens=[endoftext])
    tokenizer = Tokenizer(str(path))
    assert (tokenizer.family, tokenizer.n_words, tokenizer.eos_id) == ("bpe", 4, 3)
    assert ours(tokenizer, "abba") == [2, 1, 0]


def test_unsupported_model_type_is_rejected(tmp_path):
    path = tokenizer_json(tmp_path, model={"type": "Unigram", "vocab": [["a", 0.0]]})
    with pytest.raises(ValueError, match="model type 'Unigram'; only byte-level BPE"):
        Tokenizer(str(path))


def test_sentencepiece_style_pre_tokenizer_is_rejected(tmp_path):
    path = tokenizer_json(tmp_path, pre_tokenizer={"type": "Metaspace", "replacement": "▁"})
    with pytest.raises(ValueError, match=re.escape('pre_tokenizer {"type": "Metaspace"')):
        Tokenizer(str(path))


def test_prefix_space_pre_tokenizer_is_rejected(tmp_path):
    path = tokenizer_json(tmp_path, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True})
    with pytest.raises(ValueError, match="is not supported"):
        Tokenizer(str(path))


def test_normalizer_is_rejected(tmp_path):
    path = tokenizer_json(tmp_path, normalizer={"type": "NFC"})
    with pytest.raises(ValueError, match=re.escape('normalizer {"type": "NFC"} is not supported')):
        Tokenizer(str(path))


def test_byte_fallback_model_is_rejected(tmp_path):
    model = {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True}
    with pytest.raises(ValueError, match="model.byte_fallback = True is not supported"):
        Tokenizer(str(tokenizer_json(tmp_path, model=model)))


def test_vocabulary_outside_the_byte_alphabet_is_rejected(tmp_path):
    model = {"type": "BPE", "vocab": {"▁a": 0, "<|endoftext|>": 1}, "merges": []}
    with pytest.raises(ValueError, match="'▁a' is not spelled in the GPT-2 byte alphabet"):
        Tokenizer(str(tokenizer_json(tmp_path, model=model)))


def test_tokenizer_without_eos_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=re.escape("no EOS token: '<|im_end|>' or '<|endoftext|>'")):
        Tokenizer(str(tokenizer_json(tmp_path)))
