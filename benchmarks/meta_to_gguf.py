"""Write a checkpoint's weights as a GGUF file llama.cpp runs, for the benchmark's side-by-side rows.

    python benchmarks/meta_to_gguf.py CKPT_DIR VOCAB_GGUF OUT.gguf [--outtype f32|f16]

CKPT_DIR is anything llama.checkpoints.convert reads (a Meta folder, e.g. a synthetic benchmark model).
The vocabulary comes from VOCAB_GGUF, one of llama.cpp's own vocabulary files
(`ggml-vocab-llama-spm.gguf` for Llama 2, `ggml-vocab-llama-bpe.gguf` for Llama 3, in the
llama-cpp-python sdist), whose `tokenizer.*` metadata is copied as is. llama.cpp keeps q/k in
Meta's interleaved RoPE layout, so the weights are written unchanged. A timing tool, not a
converter: it writes no chat template and trusts that the vocabulary matches the checkpoint.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.args import ffn_hidden_dim  # noqa: E402
from llama.checkpoints.gguf import ROPE_FREQS, gguf_name, import_gguf, llama31_rope_divisors  # noqa: E402
from llama.checkpoints.source import read_as_meta  # noqa: E402

NUMPY_DTYPES = {"f32": "float32", "f16": "float16"}


def write_gguf(ckpt_dir: Path, vocab_gguf: Path, out: Path, outtype: str = "f32") -> Path:
    gguf = import_gguf()
    params, tensors = read_as_meta(ckpt_dir)
    vocab = gguf.GGUFReader(vocab_gguf)
    n_vocab = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    if n_vocab != params["vocab_size"]:
        raise ValueError(f"{vocab_gguf} has {n_vocab} tokens but {ckpt_dir} has vocab_size {params['vocab_size']}")

    dim, n_heads = params["dim"], params["n_heads"]
    head_dim = dim // n_heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(ckpt_dir.name)
    writer.add_block_count(params["n_layers"])
    writer.add_context_length(8192)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(params.get("n_kv_heads") or n_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(params["rope_theta"])
    writer.add_layer_norm_rms_eps(params["norm_eps"])
    writer.add_vocab_size(params["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, bool):  # before int: llama.cpp refuses a flag stored as a number
                writer.add_bool(key, value)
            else:
                writer.add_uint32(key, int(value))

    for key in tensors:
        if key == "rope.freqs":
            continue
        w = tensors[key].float()
        # llama.cpp keeps norms in f32 whatever the file type.
        dtype = "float32" if w.ndim == 1 else NUMPY_DTYPES[outtype]
        writer.add_tensor(gguf_name(key), w.numpy().astype(dtype))
    if params.get("use_scaled_rope"):
        writer.add_tensor(ROPE_FREQS, llama31_rope_divisors(head_dim, params["rope_theta"]).numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", type=Path)
    p.add_argument("vocab_gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", choices=NUMPY_DTYPES, default="f32")
    a = p.parse_args()
    print(write_gguf(a.ckpt_dir, a.vocab_gguf, a.out, a.outtype))


if __name__ == "__main__":
    main()
