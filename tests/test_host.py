"""Threads fit the CPUs this process may use (affinity, cgroup quota, torchrun processes), with overrides;
weights live in memory the OS may back with 2 MB pages."""

import logging
import sys

import pytest
import torch

from llama.runtime import host


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv(host.ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_affinity_mask_not_the_host(monkeypatch, two_cpus):
    monkeypatch.setattr(host.os, "cpu_count", lambda: 64)
    assert host.choose_threads() == 2


def test_a_cgroup_quota_caps_the_threads(monkeypatch, two_cpus):
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: 1.5)
    assert host.choose_threads() == 1


def test_torchrun_processes_of_one_node_share_the_cpus(monkeypatch, two_cpus):
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host.choose_threads() == 2


def test_environment_variable_overrides(monkeypatch, two_cpus):
    monkeypatch.setenv(host.ENV, "5")
    assert host.choose_threads() == 5


def test_explicit_threads_override_the_environment(monkeypatch, two_cpus):
    monkeypatch.setenv(host.ENV, "5")
    assert host.choose_threads(3) == 3


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_environment_value_is_named(monkeypatch, two_cpus, value):
    monkeypatch.setenv(host.ENV, value)
    with pytest.raises(ValueError, match=host.ENV if value == "two" else "positive"):
        host.choose_threads()


def test_cgroup_v2_quota_is_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert host.cgroup_cpu_quota(tmp_path) == 1.5


def test_cgroup_v2_without_quota_is_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_is_read(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert host.cgroup_cpu_quota(tmp_path) == 3.0


def test_configure_sets_torch_threads_and_logs_the_choice(monkeypatch, two_cpus, restore_torch_threads, caplog):
    monkeypatch.setattr(host.configure_threads, "logged", False, raising=False)
    with caplog.at_level(logging.INFO, logger="llama.runtime.host"):
        assert host.configure_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert "Computing with 1 CPU thread (from threads=)" in caplog.text


def _vm_flags(address: int) -> list:
    """The VmFlags of this process's mapping that holds address (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise LookupError(f"no mapping holds {address:#x}")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")


@linux_only
def test_arena_memory_asks_for_huge_pages_from_a_2mb_boundary():
    arena = host.huge_page_arena(4 << 20)
    t = arena.empty((1024, 1024), torch.float32)
    assert t.data_ptr() % host.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE


@linux_only
def test_arena_tensors_are_cache_line_aligned_and_disjoint():
    arena = host.huge_page_arena(1 << 16)
    a, b = arena.empty((3, 5), torch.float32), arena.empty((7,), torch.bfloat16)
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0
    assert bool((a == 1.0).all()) and bool((b == 2.0).all())


@linux_only
def test_an_arena_refuses_more_than_it_was_made_for():
    arena = host.huge_page_arena(1000)
    with pytest.raises(MemoryError, match="bytes asked"):
        arena.empty((host.HUGE_PAGE,), torch.uint8)


@linux_only
def test_loaded_large_cpu_weights_lie_in_huge_page_memory_and_norms_do_not(llama3):
    output = llama3.model.output.weight  # 128256 x 64 floats
    assert output.dtype == torch.float32 and "hg" in _vm_flags(output.data_ptr())
    assert "hg" not in _vm_flags(llama3.model.norm.weight.data_ptr())  # 64 floats: no 2 MB page for them


@linux_only
def test_compact_weights_lie_in_huge_page_memory(llama3_ckpt, llama3_tokenizer_path):
    from llama import Llama

    model = Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=1, weight_format="int4").model
    attention, feed_forward = model.layers[0].attention, model.layers[0].feed_forward
    stored = [attention.wqkv.weight, attention.wqkv.weight_min, feed_forward.w13.weight, attention.wo.weight,
              feed_forward.w2.weight_scale, model.output.weight]
    assert all("hg" in _vm_flags(t.data_ptr()) for t in stored)
    assert attention.wq.weight.data_ptr() == attention.wqkv.weight.data_ptr()  # the fused weight's view, not a copy


@linux_only
def test_compact_weights_give_the_same_logits_without_huge_pages(monkeypatch, llama3_ckpt, llama3_tokenizer_path):
    from llama import Llama
    from llama.layers import compact

    def build():
        return Llama.build(str(llama3_ckpt), str(llama3_tokenizer_path), max_seq_len=64, max_batch_size=1, weight_format="int8").model

    tokens = torch.tensor([[1, 50, 900, 7]])
    with_arena = build()
    monkeypatch.setattr(compact, "huge_page_arena", lambda nbytes: None)  # as off Linux, or where mmap is refused
    without = build()
    assert "hg" in _vm_flags(with_arena.layers[0].attention.wqkv.weight.data_ptr())
    assert "hg" not in _vm_flags(without.layers[0].attention.wqkv.weight.data_ptr())
    assert torch.equal(with_arena.forward(tokens, 0), without.forward(tokens, 0))


@linux_only
def test_a_gguf_q8_embedding_and_its_tied_output_share_blocks_in_huge_page_memory(smollm2_gguf_path):
    from llama import Llama

    model = Llama.build(str(smollm2_gguf_path), None, max_seq_len=64, max_batch_size=1, weight_format="int4").model
    assert model.tok_embeddings.q.data_ptr() == model.output.weight.data_ptr()
    assert "hg" in _vm_flags(model.output.weight.data_ptr()) and "hg" in _vm_flags(model.output.weight_scale.data_ptr())
