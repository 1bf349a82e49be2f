"""llama.kernels: CPU products of a few rows with fp32, int8 and 4-bit weights, against torch."""

import ctypes
import logging
import subprocess

import numpy as np
import pytest
import torch
from gguf.quants import GGMLQuantizationType, dequantize

from llama import kernels
from llama.kernels import build, decode
from llama.layers.linear import pack_weight

ROWS = (1, 2, 3, 4, 7, 16)
# SmolLM2's shapes (its 49152-row output layer shrunk), odd sizes off the SIMD width, a tall one,
# and one split between threads whose last chunk ends in rows short of a whole tile.
SHAPES_F32 = [(576, 576), (1536, 576), (576, 1536), (37, 19), (5, 1), (3001, 64), (1001, 576)]
SHAPES_32 = [(576, 576), (1536, 576), (576, 1536), (37, 96), (3001, 64), (1001, 576)]  # k a multiple of 32


@pytest.fixture(scope="module")
def native():
    """The native library: built here (a missing compiler skips; a failed build fails)."""
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built")
    kernels._library.cache_clear()
    assert kernels.available(), "the native kernels failed to build: see the warning logged above"
    yield
    kernels._library.cache_clear()


@pytest.fixture
def torch_only(monkeypatch):
    """The fallback: no native library, every product runs its torch reference."""
    monkeypatch.setenv("LLAMA_KERNELS", "torch")
    kernels._library.cache_clear()
    yield
    monkeypatch.undo()
    kernels._library.cache_clear()


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(y, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def _gguf_blocks(qtype: GGMLQuantizationType, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random but well-formed GGUF blocks (n, row_bytes): finite fp16 scales, random quants."""
    rng = np.random.default_rng(seed)
    blocks = k // 32
    size = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}[qtype]
    data = rng.integers(0, 256, size=(n, blocks, size), dtype=np.uint8)
    halves = 2 if qtype == GGMLQuantizationType.Q4_1 else 1  # d, and m for Q4_1
    scales = rng.normal(0, 0.05, size=(n, blocks, halves)).astype(np.float16)
    data[:, :, : 2 * halves] = scales.view(np.uint8).reshape(n, blocks, -1)
    return data.reshape(n, -1)


def _bits(a: np.ndarray) -> np.ndarray:
    """Float32 bits, zeros made positive: Q4_0's d * (q - 8) gives -0.0 where d < 0, and
    d * q + (-8 * d) gives +0.0; both are zero in every product."""
    return (a.astype(np.float32) + np.float32(0)).view(np.uint32)


# --- products against the torch references ---

@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES_F32)
def test_linear_f32_matches_f_linear(native, m, n, k):
    x, w = torch.randn(m, k), torch.randn(n, k)
    _close(kernels.linear_f32(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES_F32)
def test_linear_q8_per_row_scale_matches_reference(native, m, n, k):
    x = torch.randn(m, k)
    q, scale = kernels.quantize_q8(torch.randn(n, k))
    _close(kernels.linear_q8(x, q, scale), kernels.reference_linear_q8(x, q, scale))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES_32)
def test_linear_q8_per_block_scale_matches_reference(native, m, n, k):
    x = torch.randn(m, k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // 32)
    _close(kernels.linear_q8(x, q, scale), kernels.reference_linear_q8(x, q, scale))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES_32)
def test_linear_q4_matches_reference(native, m, n, k):
    x = torch.randn(m, k)
    w = kernels.quantize_q4(torch.randn(n, k))
    _close(kernels.linear_q4(x, w), kernels.reference_linear_q4(x, w))


def test_linear_q4_with_groups_of_64_matches_reference(native):
    x = torch.randn(3, 256)
    w = kernels.quantize_q4(torch.randn(40, 256), group=64)
    _close(kernels.linear_q4(x, w), kernels.reference_linear_q4(x, w))


def _dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    q, d, _ = kernels.quantize_activations_q8(x)
    rows, k = q.shape[0], x.shape[-1]
    return (q.float().view(rows, -1, 32) * d[:, :, None]).view(rows, -1)[:, :k]


def test_linear_q4_on_gguf_blocks_matches_gguf_dequantized_weight(native):
    blocks = _gguf_blocks(GGMLQuantizationType.Q4_1, 64, 576)
    x = torch.randn(4, 576)
    w = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1))
    ref = torch.nn.functional.linear(_dequantized_activations(x), w)
    _close(kernels.linear_q4(x, kernels.q4_from_gguf(blocks, GGMLQuantizationType.Q4_1)), ref)


def _identity_products(x: torch.Tensor) -> list:
    """x times the (k, k) identity as int8 (unit block scales) and as 4-bit values (d = 1, m = 0):
    each returns the quantized activations bit for bit."""
    k = x.shape[1]
    halves = torch.eye(k, dtype=torch.uint8).view(k, k // 32, 2, 16)  # columns j and j + 16 of each block
    ones = torch.ones(k, k // 32, dtype=torch.float16)
    q4 = kernels.Q4Weight((halves[:, :, 0] | halves[:, :, 1] << 4).reshape(k, k // 2), ones, torch.zeros_like(ones))
    return [kernels.linear_q8(x, torch.eye(k, dtype=torch.int8), torch.ones(k, k // 32)), kernels.linear_q4(x, q4)]


def test_kernels_quantize_activations_as_quantize_activations_q8(native):
    """An identity weight returns the quantized activations bit for bit."""
    k = 96
    x = torch.randn(3, k) * torch.logspace(-3, 3, k)  # blocks of very different scales
    x[1, :32] = torch.cat([torch.tensor([127.0]), torch.arange(-15, 16) + 0.5])  # scale 1: ties
    x[2, 32:64] = 0  # an all-zero block
    assert all(torch.equal(y, _dequantized_activations(x)) for y in _identity_products(x))


def test_quantize_activations_q8_divides_as_the_kernels_do(native):
    """127 / amax is a true division on both sides: torch's `127 / tensor` multiplies by a rounded
    reciprocal, which moves a few of these 98304 blocks' values to the other side of a half."""
    k = 96
    x = torch.randn(32768, k, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(y, _dequantized_activations(x)) for y in _identity_products(x))


def test_quantize_activations_q8_rounds_per_block_half_to_even():
    x = torch.zeros(1, 40)
    x[0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # the block's scale is 1
    x[0, 32:34] = torch.tensor([-1.0, 0.25])  # a short last block, scaled by 1 / 127
    q, d, s = kernels.quantize_activations_q8(x)
    assert q.shape == (1, 64) and torch.equal(d, torch.tensor([[1.0, 1 / 127]]))
    assert q[0, :4].tolist() == [127, 2, -4, 0]
    assert q[0, 32:35].tolist() == [-127, 32, 0] and not q[0, 34:].any()
    assert torch.equal(s, d * q.view(1, 2, 32).sum(dim=2).float())


@pytest.mark.parametrize("product", ["q8", "q4"])
def test_quantized_products_stay_close_to_the_fp32_product(native, product):
    """Quantizing activations per block costs about 1% of the output's scale, no more."""
    x, w = torch.randn(4, 576), torch.randn(256, 576)
    if product == "q8":
        q, scale = kernels.quantize_q8(w)
        y, exact = kernels.linear_q8(x, q, scale), torch.nn.functional.linear(x, kernels.dequantize_q8(q, scale))
    else:
        p = kernels.quantize_q4(w)
        y, exact = kernels.linear_q4(x, p), torch.nn.functional.linear(x, kernels.dequantize_q4(p))
    assert float((y - exact).abs().max()) < 0.02 * float(exact.abs().max())


def test_products_keep_leading_dimensions(native):
    x, w = torch.randn(2, 3, 64), torch.randn(10, 64)
    assert kernels.linear_f32(x, w).shape == (2, 3, 10)


@pytest.mark.parametrize("weight_format", ["f32", "q8", "q4"])
@pytest.mark.parametrize("m", [1, 4])
def test_products_of_several_weights_are_each_weights_product_side_by_side(native, weight_format, m):
    """llk_linear_parts (a layer's q, k, v kept apart, in one pool run) gives each weight's own
    product bit for bit, the outputs of a row side by side."""
    lib = kernels._library()
    x = torch.randn(m, 576)
    weights = [torch.randn(n, 576) for n in (960, 192, 192)]
    parts, keep, alone = [], [], []
    for w in weights:
        if weight_format == "f32":
            parts.append(decode.linear(w, None, None))
            alone.append(kernels.linear_f32(x, w))
        elif weight_format == "q8":
            q, scale = kernels.quantize_q8(w)
            keep += [q, scale]
            parts.append(decode.linear(q, scale, None))
            alone.append(kernels.linear_q8(x, q, scale))
        else:
            p = kernels.quantize_q4(w)
            keep.append(p)
            parts.append(decode.linear(p.qs, p.d, p.m))
            alone.append(kernels.linear_q4(x, p))
    y = torch.empty(m, sum(w.shape[0] for w in weights))
    lib.llk_linear_parts(ctypes.byref((decode.Linear * 3)(*parts)), 3, x.data_ptr(), y.data_ptr(), m)
    assert torch.equal(y, torch.cat(alone, dim=1))


def test_results_do_not_depend_on_the_number_of_threads(native):
    x, w = torch.randn(4, 576), torch.randn(1536, 576)  # enough weights to be split between threads
    default = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        one = kernels.linear_f32(x, w)
        kernels.set_num_threads(3)
        assert torch.equal(kernels.linear_f32(x, w), one)
    finally:
        kernels.set_num_threads(default)


# --- formats ---

@pytest.mark.parametrize("k,group", [(96, 32), (70, None)])  # per 32 columns; per row where 32 does not divide k
def test_quantize_q8_is_linear_pack_weight_int8(k, group):
    w = torch.randn(30, k)
    q, scale = kernels.quantize_q8(w, group)
    q_ref, scale_ref = pack_weight(w, "int8", torch.device("cpu"))
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_quantize_q8_per_group_rounds_each_block_to_its_own_scale():
    w = torch.randn(4, 64)
    w[:, 40] = 100.0  # an outlier in the second block leaves the first block's scale alone
    q, scale = kernels.quantize_q8(w, 32)
    assert scale.shape == (4, 2) and torch.equal(scale[:, 0], w[:, :32].abs().amax(dim=1) / 127)
    assert (kernels.dequantize_q8(q, scale)[:, :32] - w[:, :32]).abs().max() <= scale[:, 0].max() / 2 + 1e-6


def test_quantize_q4_rounds_to_the_nearest_level():
    w = torch.randn(16, 128)
    p = kernels.quantize_q4(w)
    groups = w.view(16, 4, 32)
    step = p.d.float()[:, :, None]
    min_rounding = (p.m.float() - groups.amin(dim=2)).abs()[:, :, None]
    error = (kernels.dequantize_q4(p).view(16, 4, 32) - groups).abs()
    assert bool((error <= step / 2 + min_rounding + 1e-6).all())


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0])
def test_q4_from_gguf_dequantizes_bit_for_bit_as_gguf(qtype):
    blocks = _gguf_blocks(qtype, 8, 128)
    ours = kernels.dequantize_q4(kernels.q4_from_gguf(blocks, qtype))
    np.testing.assert_array_equal(_bits(ours.numpy()), _bits(dequantize(blocks, qtype)))


def test_q8_from_gguf_dequantizes_bit_for_bit_as_gguf():
    blocks = _gguf_blocks(GGMLQuantizationType.Q8_0, 8, 128)
    ours = kernels.dequantize_q8(*kernels.q8_from_gguf(blocks))
    np.testing.assert_array_equal(_bits(ours.numpy()), _bits(dequantize(blocks, GGMLQuantizationType.Q8_0)))


def test_q4_from_gguf_takes_a_qtype_name_and_read_only_bytes():
    blocks = _gguf_blocks(GGMLQuantizationType.Q4_1, 4, 64)
    blocks.flags.writeable = False  # as a memory-mapped GGUF file gives them
    w = kernels.q4_from_gguf(blocks, "Q4_1")
    assert w.shape == (4, 64) and w.group == 32


def test_q4_from_gguf_rejects_q8_0():
    with pytest.raises(ValueError, match="q8_from_gguf"):
        kernels.q4_from_gguf(_gguf_blocks(GGMLQuantizationType.Q8_0, 2, 32), GGMLQuantizationType.Q8_0)


# --- the fallback and the build ---

def test_fallback_runs_the_torch_references(torch_only):
    x, w = torch.randn(3, 96), torch.randn(20, 96)
    q, scale = kernels.quantize_q8(w)
    p = kernels.quantize_q4(w)
    assert not kernels.available()
    assert torch.equal(kernels.linear_f32(x, w), torch.nn.functional.linear(x, w))
    assert torch.equal(kernels.linear_q8(x, q, scale), kernels.reference_linear_q8(x, q, scale))
    assert torch.equal(kernels.linear_q4(x, p), kernels.reference_linear_q4(x, p))


def test_without_a_compiler_one_warning_says_products_fall_back(monkeypatch, caplog):
    monkeypatch.delenv("LLAMA_KERNELS", raising=False)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llama.kernels"):
            kernels.linear_f32(torch.randn(1, 8), torch.randn(4, 8))
            kernels.linear_f32(torch.randn(1, 8), torch.randn(4, 8))
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "fall back to torch" in warnings[0].getMessage()
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()


def test_cache_key_includes_the_cpu_flags(monkeypatch):
    compiler = build.find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    here = build.library_path(compiler)
    monkeypatch.setattr(build, "cpu_flags", lambda: "sse2")
    assert build.library_path(compiler) != here


def test_an_environment_variable_chooses_the_instruction_set(monkeypatch):
    monkeypatch.setenv(build.MARCH_ENV, "haswell")
    assert "-march=haswell" in build.default_flags() and "-march=native" not in build.default_flags()
    monkeypatch.delenv(build.MARCH_ENV)
    assert "-march=native" in build.default_flags()


@pytest.mark.parametrize(
    "march,isa,needed",
    [
        (None, "portable", []),
        ("haswell", "avx2", ["avx2", "fma", "f16c"]),
        ("alderlake", "avx2", ["avx2", "fma", "f16c", "avx_vnni"]),  # 128-bit VNNI integer products
        ("icelake-server", "avx512", ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"]),
    ],
)
def test_each_instruction_set_build_matches_torch(native, march, isa, needed):
    """The plain C++ path (CPUs without AVX2), AVX2 alone, AVX2 with AVX-VNNI and AVX-512 with VNNI,
    each built and called directly where this CPU can run it, on shapes with partial blocks and groups."""
    if any(flag not in build.cpu_flags().split() for flag in needed):
        pytest.skip(f"this CPU cannot run {march} code")
    flags = tuple(f for f in build.FLAGS if f != "-march=native") + ((f"-march={march}",) if march else ())
    lib = build.load(build.build(build.find_compiler(), flags))
    assert lib.llk_isa() == isa.encode()
    lib.llk_set_threads(2)
    for m, n, k in [(3, 9, 70), (1, 300, 576), (5, 65, 544), (2, 17, 1536)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        y = torch.empty(m, n)
        lib.llk_linear_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, k, n)
        _close(y, torch.nn.functional.linear(x, w))
        q, scale = kernels.quantize_q8(w)
        lib.llk_linear_q8(x.data_ptr(), q.data_ptr(), scale.data_ptr(), 1, y.data_ptr(), m, k, n)
        _close(y, kernels.reference_linear_q8(x, q, scale))
        if k % 64 == 0:
            block_scale = torch.rand(n, k // 32) + 0.5
            lib.llk_linear_q8(x.data_ptr(), q.data_ptr(), block_scale.data_ptr(), k // 32, y.data_ptr(), m, k, n)
            _close(y, kernels.reference_linear_q8(x, q, block_scale))
            for group in (32, 64):
                p = kernels.quantize_q4(w, group=group)
                lib.llk_linear_q4(x.data_ptr(), p.qs.data_ptr(), p.d.data_ptr(), p.m.data_ptr(), k // group, y.data_ptr(), m, k, n)
                _close(y, kernels.reference_linear_q4(x, p))


@pytest.mark.parametrize("march", ["skylake-avx512", "icelake-server", "alderlake"])
def test_avx512_and_vnni_paths_compile(native, march):
    """This CPU may lack AVX-512 and VNNI (AVX512-VNNI on icelake-server, AVX-VNNI on alderlake):
    at least their code must compile."""
    flags = ["-std=c++17", "-fsyntax-only", f"-march={march}"]
    result = subprocess.run([build.find_compiler(), *flags, *map(str, build.SOURCES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- errors ---

@pytest.mark.parametrize(
    "x,w,message",
    [
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), "x must be a contiguous torch.float32"),
        (torch.randn(2, 8), torch.randn(4, 8).half(), "w must be a contiguous torch.float32"),
        (torch.randn(2, 9), torch.randn(4, 8), "k = 8 columns, got shape \\(2, 9\\)"),
        (torch.randn(8, 2).t(), torch.randn(4, 8), "non-contiguous"),
    ],
)
def test_linear_f32_rejects_bad_inputs(x, w, message):
    with pytest.raises(ValueError, match=message):
        kernels.linear_f32(x, w)


def test_linear_q8_rejects_scales_that_do_not_split_k_into_blocks():
    q = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="scale groups"):
        kernels.linear_q8(torch.randn(1, 64), q, torch.ones(4, 4))


# --- torch.compile ---

def test_compiled_graph_calls_the_products_without_graph_breaks(native):
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    p = kernels.quantize_q4(w)
    q, scale = kernels.quantize_q8(w)

    def f(x):
        return kernels.linear_f32(x, w) + kernels.linear_q4(x, p) + kernels.linear_q8(x, q, scale)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    _close(compiled(x), f(x))
