"""params.json values: refused where the file is read, naming the file, the field and the value.

Meta's code would take any of these into ModelArgs and fail deep in the model (TypeError,
ZeroDivisionError) or, worse, build a different model without a word.
"""

import json
import math
from pathlib import Path

import pytest

from llama import Llama
from llama.args import REQUIRED_PARAMS, CheckpointError
from llama.checkpoints.convert import convert_meta_to_hf
from llama.checkpoints.reshard import reshard


def with_params(folder: Path, ckpt: Path, params: dict) -> Path:
    """A checkpoint folder holding `params` as params.json and ckpt's shard (linked, not copied)."""
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "consolidated.00.pth").symlink_to(ckpt / "consolidated.00.pth")
    return folder


def build(folder: Path, tokenizer_path: Path) -> Llama:
    return Llama.build(str(folder), str(tokenizer_path), max_seq_len=32, max_batch_size=2)


@pytest.fixture
def llama3_params(llama3_ckpt) -> dict:
    return json.loads((llama3_ckpt / "params.json").read_text())


@pytest.mark.parametrize("field", REQUIRED_PARAMS)
def test_a_params_json_without_a_shape_field_is_refused_naming_it(tmp_path, llama3_ckpt, llama3_params, llama3_tokenizer_path, field):
    params = {k: v for k, v in llama3_params.items() if k != field}
    folder = with_params(tmp_path / "ckpt", llama3_ckpt, params)
    with pytest.raises(CheckpointError, match=rf"params\.json lacks {field}: a params\.json names the model's shape"):
        build(folder, llama3_tokenizer_path)


BAD_VALUES = {
    "dim-string": ("dim", "64", r"dim = '64': must be a positive integer"),
    "dim-negative": ("dim", -64, r"dim = -64: must be a positive integer"),
    "n_layers-bool": ("n_layers", True, r"n_layers = True: must be a positive integer"),
    "n_layers-float": ("n_layers", 2.0, r"n_layers = 2\.0: must be a positive integer"),
    "n_heads-string": ("n_heads", "4", r"n_heads = '4': must be a positive integer"),
    "n_heads-zero": ("n_heads", 0, r"n_heads = 0: must be a positive integer"),
    "n_heads-not-dividing-dim": ("n_heads", 3, r"n_heads = 3: dim 64 must split into n_heads heads of an even size"),
    "n_heads-odd-head-size": ("n_heads", 64, r"n_heads = 64: dim 64 must split into n_heads heads of an even size"),
    "n_kv_heads-not-dividing-n_heads": ("n_kv_heads", 3, r"n_kv_heads = 3: must divide n_heads \(4\)"),
    "n_kv_heads-zero": ("n_kv_heads", 0, r"n_kv_heads = 0: must be a positive integer, or null"),
    "vocab_size-zero": ("vocab_size", 0, r"vocab_size = 0: must be a positive integer, or -1"),
    "multiple_of-string": ("multiple_of", "32", r"multiple_of = '32': must be a positive integer"),
    "ffn_dim_multiplier-string": ("ffn_dim_multiplier", "1.3", r"ffn_dim_multiplier = '1.3': must be a positive number, or null"),
    "norm_eps-string": ("norm_eps", "1e-5", r"norm_eps = '1e-5': must be a positive number"),
    "norm_eps-zero": ("norm_eps", 0, r"norm_eps = 0: must be a positive number"),
    "rope_theta-string": ("rope_theta", "500000", r"rope_theta = '500000': must be a positive number"),
    "rope_theta-nan": ("rope_theta", math.nan, r"rope_theta = nan: must be a positive number"),
    "use_scaled_rope-string": ("use_scaled_rope", "true", r"use_scaled_rope = 'true': must be true or false"),
}


@pytest.mark.parametrize("field, value, message", BAD_VALUES.values(), ids=list(BAD_VALUES))
def test_a_params_json_value_of_the_wrong_type_or_range_is_refused_naming_file_field_and_value(
    tmp_path, llama3_ckpt, llama3_params, llama3_tokenizer_path, field, value, message
):
    folder = with_params(tmp_path / "ckpt", llama3_ckpt, {**llama3_params, field: value})
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'ckpt' / 'params.json'}: {message}"):
        build(folder, llama3_tokenizer_path)


def test_an_integer_rope_theta_is_accepted_as_in_code_llamas_params_json(tmp_path, llama3_ckpt, llama3_params, llama3_tokenizer_path):
    folder = with_params(tmp_path / "ckpt", llama3_ckpt, {**llama3_params, "rope_theta": 500000})
    assert build(folder, llama3_tokenizer_path).model.params.rope_theta == 500000


def test_llama_reshard_reads_params_json_through_the_same_check(tmp_path, llama3_ckpt, llama3_params):
    folder = with_params(tmp_path / "ckpt", llama3_ckpt, {**llama3_params, "n_heads": "4"})
    with pytest.raises(CheckpointError, match=r"params\.json: n_heads = '4': must be a positive integer"):
        reshard(str(folder), str(tmp_path / "out"), 2)
    assert not (tmp_path / "out").exists()


def test_llama_convert_reads_params_json_through_the_same_check(tmp_path, llama3_ckpt, llama3_params):
    folder = with_params(tmp_path / "ckpt", llama3_ckpt, {k: v for k, v in llama3_params.items() if k != "n_layers"})
    with pytest.raises(CheckpointError, match=r"params\.json lacks n_layers"):
        convert_meta_to_hf(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
