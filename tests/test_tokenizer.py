"""Tokenizer: family detection, Meta's ids and special tokens, reference vectors, round trips
(byte-level BPE specifics are in test_hf_tokenizer.py)."""

import base64
import time

import pytest

from llama.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer
from llama.tokenizers.byte_level_bpe import ByteLevelBPETokenizer

TRICKY_TEXTS = {
    "ascii": "Hello, world! It's 3.14 o'clock.",
    "leading_and_trailing_spaces": "  padded  ",
    "whitespace_runs": "a  b   c\t\t\td\n\n\ne \r\n f",
    "only_whitespace": " \t\n ",
    "empty": "",
    "cjk": "我想在apple工作1314151天～ 日本語のテキスト 한국어",
    "cyrillic_and_khmer": "нещо на Български កាន់តែពិសេស",
    "emoji": "🦙 🚀 ✅ 😁",
    "emoji_zwj_sequences": "👩‍👩‍👧‍👦 🏳️‍🌈 😶‍🌫️ 🧑🏽‍💻",
    "combining_marks": "e\u0301 n\u0303 Z\u0351\u0358\u0362a\u0300\u0301\u0302",
    "decomposed_and_composed": "Cu\u031b\u0309a Việt",
    "control_characters": "\x00nul \x07bell \x7fdel",
    "code": 'def f(x):\n\treturn {"a": [x, x**2]}  # ok\n',
    "special_token_lookalikes": "[INST] <<SYS>> <|eot_id|> <s></s> <|im_start|><|im_end|>",
}

LLAMA3_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_1|>": 128003,
    "<|finetune_right_pad_id|>": 128004,
    "<|reserved_special_token_2|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|reserved_special_token_3|>": 128011,
    "<|reserved_special_token_247|>": 128255,
}


@pytest.fixture(params=["llama2", "llama3", "smollm2"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tokenizer")


# Family detection and errors


def test_sentencepiece_file_gives_llama2_tokenizer(llama2_tokenizer_path):
    tokenizer = Tokenizer(str(llama2_tokenizer_path))
    assert type(tokenizer) is SentencePieceTokenizer
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.family == "llama2"


def test_tiktoken_rank_file_gives_llama3_tokenizer(llama3_tokenizer_path):
    tokenizer = Tokenizer(model_path=str(llama3_tokenizer_path))
    assert type(tokenizer) is TiktokenTokenizer
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.family == "llama3"


def test_missing_file_names_path_and_fix(tmp_path):
    path = tmp_path / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as info:
        Tokenizer(str(path))
    assert str(path) in str(info.value)
    assert "--tokenizer_path" in str(info.value)


def test_directory_is_rejected_and_points_at_the_file_inside(tmp_path, llama3_tokenizer_path):
    (tmp_path / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes())
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        Tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.model") in str(info.value)


def test_garbage_file_is_a_value_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="neither a tiktoken BPE rank file") as info:
        Tokenizer(str(path))
    assert str(path) in str(info.value)


def test_empty_file_is_a_value_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer(str(path))


def test_hugging_face_tokenizer_json_gives_byte_level_bpe_tokenizer(smollm2_tokenizer_json):
    tokenizer = Tokenizer(str(smollm2_tokenizer_json))
    assert type(tokenizer) is ByteLevelBPETokenizer
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.family == "chatml"


def test_json_without_a_vocabulary_is_a_value_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(ValueError, match="model.vocab is missing") as info:
        Tokenizer(str(path))
    assert str(path) in str(info.value)


def test_bad_line_deep_in_rank_file_is_named(tmp_path):
    good = [base64.b64encode(bytes([i % 256, i // 256])) + b" %d" % i for i in range(2000)]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(good + [b"not-base64!! x"]) + b"\n")
    with pytest.raises(ValueError, match="line 2001"):
        Tokenizer(str(path))


# Llama 2 (SentencePiece)


def test_llama2_ids_are_metas(llama2_tokenizer):
    assert llama2_tokenizer.n_words == 32000
    assert (llama2_tokenizer.bos_id, llama2_tokenizer.eos_id, llama2_tokenizer.pad_id) == (1, 2, -1)
    assert llama2_tokenizer.stop_tokens == {2}
    assert llama2_tokenizer.special_tokens == {}


def test_llama2_reproduces_llama_cpp_reference_vectors(llama2_tokenizer, llama2_vocab_vectors):
    # The recorded ids come from the original tokenizer without BOS (add_special_tokens=False).
    assert len(llama2_vocab_vectors) == 46
    mismatches = [
        (text, ids, llama2_tokenizer.encode(text, bos=False, eos=False))
        for text, ids in llama2_vocab_vectors
        if llama2_tokenizer.encode(text, bos=False, eos=False) != ids
    ]
    assert mismatches == []


def test_llama2_adds_a_dummy_prefix_space(llama2_tokenizer):
    assert llama2_tokenizer.encode("Hello", bos=False, eos=False) == [15043]
    assert llama2_tokenizer.encode(" Hello", bos=False, eos=False) == [29871, 15043]


def test_llama2_decodes_single_ids(llama2_tokenizer):
    assert llama2_tokenizer.decode([15043]) == "Hello"
    assert llama2_tokenizer.decode([13]) == "\n"  # byte-fallback piece <0x0A>
    assert llama2_tokenizer.decode([1]) == ""  # control tokens have no text
    assert llama2_tokenizer.decode(()) == ""


# Llama 3 (tiktoken)


def test_llama3_ids_are_metas(llama3_tokenizer):
    assert llama3_tokenizer.n_words == 128256
    assert (llama3_tokenizer.bos_id, llama3_tokenizer.eos_id, llama3_tokenizer.pad_id) == (
        128000,
        128001,
        -1,
    )
    assert llama3_tokenizer.stop_tokens == {128001, 128008, 128009}


def test_llama3_special_tokens_use_llama31_names(llama3_tokenizer):
    assert len(llama3_tokenizer.special_tokens) == 256
    assert sorted(llama3_tokenizer.special_tokens.values()) == list(range(128000, 128256))
    for name, token_id in LLAMA3_SPECIAL_IDS.items():
        assert llama3_tokenizer.special_tokens[name] == token_id, name


def test_llama3_reproduces_llama_cpp_reference_vectors(llama3_tokenizer, llama3_vocab_vectors):
    # llama.cpp's own pre-tokenizer is known to fail "Cửa Việt"; the recorded ids are those of
    # the original tokenizer, which tiktoken with Meta's pattern reproduces for every text.
    assert len(llama3_vocab_vectors) == 46
    mismatches = [
        (text, ids, llama3_tokenizer.encode(text, bos=False, eos=False))
        for text, ids in llama3_vocab_vectors
        if llama3_tokenizer.encode(text, bos=False, eos=False) != ids
    ]
    assert mismatches == []


def test_llama3_special_token_text_is_plain_text_by_default(llama3_tokenizer):
    ids = llama3_tokenizer.encode("<|eot_id|>", bos=False, eos=False)
    assert not set(ids) & set(llama3_tokenizer.special_tokens.values())
    assert llama3_tokenizer.decode(ids) == "<|eot_id|>"


def test_llama3_special_token_text_gives_its_id_when_allowed(llama3_tokenizer):
    expected = llama3_tokenizer.encode("hi", bos=False, eos=False) + [128009]
    for allowed in ("all", {"<|eot_id|>"}):
        ids = llama3_tokenizer.encode("hi<|eot_id|>", bos=False, eos=False, allowed_special=allowed)
        assert ids == expected, allowed


def test_llama3_disallowed_special_token_text_raises(llama3_tokenizer):
    with pytest.raises(ValueError, match="disallowed special token"):
        llama3_tokenizer.encode("<|eot_id|>", bos=False, eos=False, disallowed_special="all")


def test_llama3_decodes_single_ids(llama3_tokenizer):
    assert llama3_tokenizer.decode([9906]) == "Hello"
    assert llama3_tokenizer.decode([128009]) == "<|eot_id|>"
    assert llama3_tokenizer.decode(()) == ""


def test_llama3_long_runs_are_encoded_in_25000_char_pieces(llama3_tokenizer):
    # Meta cuts runs longer than 25,000 characters every 25,000 characters; ids depend on it.
    def plain(text):
        return llama3_tokenizer.model.encode(text, disallowed_special=())

    text = "x " + "a" * 60_000 + " y"
    expected = plain("x " + "a" * 25_000) + plain("a" * 25_000) + plain("a" * 10_000 + " y")
    assert llama3_tokenizer.encode(text, bos=False, eos=False) == expected


def test_llama3_input_is_encoded_in_400000_char_chunks(llama3_tokenizer):
    def encode(text):
        return llama3_tokenizer.encode(text, bos=False, eos=False)

    text = "hello world " * 40_000  # 480,000 characters; the cut falls inside a word
    assert encode(text) == encode(text[:400_000]) + encode(text[400_000:])


@pytest.mark.parametrize("char", ["a", " "], ids=["letters", "spaces"])
def test_llama3_million_char_run_round_trips_in_seconds(llama3_tokenizer, char):
    text = char * 1_000_000
    start = time.perf_counter()
    ids = llama3_tokenizer.encode(text, bos=False, eos=False)
    elapsed = time.perf_counter() - start
    assert llama3_tokenizer.decode(ids) == text
    assert elapsed < 10, f"encoding 1M {char!r} took {elapsed:.1f} s"


# Every family


@pytest.mark.parametrize("text", TRICKY_TEXTS.values(), ids=TRICKY_TEXTS.keys())
def test_encode_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def test_long_text_round_trips(tokenizer):
    text = "".join(TRICKY_TEXTS.values()) * 200
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def test_bos_and_eos_flags_wrap_the_ids(tokenizer):
    # bos_id -1: the tokenizer adds no BOS (SmolLM2), so bos=True adds nothing.
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id]
    ids = tokenizer.encode("Hello world", bos=False, eos=False)
    assert tokenizer.encode("Hello world", bos=True, eos=False) == bos + ids
    assert tokenizer.encode("Hello world", bos=False, eos=True) == ids + eos
    assert tokenizer.encode("Hello world", bos=True, eos=True) == bos + ids + eos
    assert tokenizer.encode("", bos=True, eos=True) == bos + eos


def test_eos_is_a_stop_token(tokenizer):
    assert tokenizer.eos_id in tokenizer.stop_tokens


def test_encode_rejects_non_str(tokenizer):
    with pytest.raises(TypeError, match="bytes"):
        tokenizer.encode(b"Hello", bos=True, eos=False)


@pytest.mark.parametrize("lone", ["\ud800", "\udfff"], ids=["high", "low"])
def test_a_lone_surrogate_is_encoded_as_the_replacement_character(tokenizer, lone):
    # No UTF-8 text holds one; tiktoken replaces it, and every family does the same.
    assert tokenizer.encode(f"a{lone}b", bos=True, eos=False) == tokenizer.encode("a\ufffdb", bos=True, eos=False)
