"""Our safetensors reader and writer: the format of the reference implementation, without the dependency."""

import json
import struct

import pytest
import torch

from llama.checkpoints.safetensors import SafetensorsError, SafetensorsFile, load_file, save_file, write_file

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


def sample(dtype: torch.dtype, shape=(3, 5), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_values_dtype_and_shape(tmp_path, dtype):
    tensors = {"matrix": sample(dtype), "vector": sample(dtype, (7,), seed=1), "scalar": sample(dtype, (), seed=2)}
    save_file(tensors, tmp_path / "t.safetensors")
    back = load_file(tmp_path / "t.safetensors")
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_files_we_write_are_read_by_the_reference_implementation(tmp_path, dtype):
    reference = pytest.importorskip("safetensors.torch", reason="safetensors comes with transformers, a test dependency")
    # Odd sizes put later tensors at offsets that are not multiples of their element size.
    tensors = {"a": sample(dtype, (3, 3)), "b": sample(torch.bfloat16, (5,), seed=1), "c": sample(dtype, (2, 4), seed=2)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    back = reference.load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_reads_the_files_transformers_saves(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e '.[test]'")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert f.metadata.get("format") == "pt"
    expected = model.state_dict()
    assert sorted(f.keys()) == sorted(expected)
    for name in f.keys():
        assert torch.equal(f.get(name), expected[name]), name


def test_header_gives_dtype_and_shape_without_reading_data(tmp_path):
    save_file({"w": sample(torch.bfloat16, (4, 6))}, tmp_path / "t.safetensors")
    assert SafetensorsFile(tmp_path / "t.safetensors").spec("w") == (torch.bfloat16, (4, 6))


def test_writing_to_a_read_tensor_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "t.safetensors"
    original = sample(torch.float32)
    save_file({"w": original}, path)
    SafetensorsFile(path).get("w").zero_()
    assert torch.equal(load_file(path)["w"], original)


def test_streaming_writer_takes_tensors_one_at_a_time(tmp_path):
    tensors = {"a": sample(torch.float16), "b": sample(torch.float32, (2,))}
    produced = []

    def produce():
        for name, tensor in tensors.items():
            produced.append(name)
            yield name, tensor

    write_file(tmp_path / "t.safetensors", {k: (v.dtype, v.shape) for k, v in tensors.items()}, produce())
    assert produced == ["a", "b"]
    assert all(torch.equal(load_file(tmp_path / "t.safetensors")[k], v) for k, v in tensors.items())


def test_streaming_writer_refuses_a_tensor_unlike_its_header_entry(tmp_path):
    specs = {"a": (torch.float16, (3, 5))}
    with pytest.raises(SafetensorsError, match=r"expected tensor 'a' torch.float16 \[3, 5\] next, got 'a' torch.float32"):
        write_file(tmp_path / "t.safetensors", specs, [("a", sample(torch.float32))])


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": sample(torch.float32, (64, 64))}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors: tensor 'w' .* outside the .* download it again"):
        SafetensorsFile(path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<html>Not Found</html>" * 10)
    with pytest.raises(SafetensorsError, match="header length .* not a safetensors file"):
        SafetensorsFile(path)


def test_unsupported_dtype_is_refused_naming_it(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(SafetensorsError, match="tensor 'w' has dtype F8_E4M3, which this reader does not support"):
        SafetensorsFile(path)


def raw_safetensors(path, header: dict, data: bytes):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_two_tensors_on_the_same_bytes_are_refused(tmp_path):
    # A crafted file whose lm_head is the embedding's bytes: read as is, the model would silently tie them.
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    path = raw_safetensors(tmp_path / "t.safetensors", {"model.embed_tokens.weight": entry, "lm_head.weight": entry}, bytes(16))
    with pytest.raises(SafetensorsError, match=r"t\.safetensors: tensors 'lm_head\.weight' .* and 'model\.embed_tokens\.weight' .* overlap"):
        SafetensorsFile(path)


def test_tensors_whose_bytes_partly_overlap_are_refused(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    with pytest.raises(SafetensorsError, match=r"tensors 'a' \(data_offsets \[0, 16\]\) and 'b' \(\[8, 24\]\) overlap"):
        SafetensorsFile(raw_safetensors(tmp_path / "t.safetensors", header, bytes(24)))


def test_empty_tensors_may_share_an_offset(tmp_path):
    header = {
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    assert SafetensorsFile(raw_safetensors(tmp_path / "t.safetensors", header, bytes(8))).keys() == ["empty", "w"]
