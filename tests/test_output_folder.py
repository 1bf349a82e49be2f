"""Every command that writes a checkpoint folder (llama-reshard, llama-convert both ways, the demo
cache through llama-convert) writes it whole or not at all, and never deletes anything but the
output folder it was asked to replace."""

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict

import pytest

from llama.checkpoints.convert import convert_meta_to_hf, convert_to_meta
from llama.checkpoints.reshard import reshard

ROOT = Path(__file__).resolve().parent.parent

# name -> (kind of source, write(source, output, overwrite)): each command the way users call it.
WRITERS: Dict[str, tuple] = {
    "reshard": ("meta", lambda src, out, overwrite: reshard(str(src), str(out), 2, overwrite=overwrite)),
    "hf-to-meta": ("hf", lambda src, out, overwrite: convert_to_meta(src, out, overwrite=overwrite, tokenizer=False)),
    "meta-to-hf": ("meta", lambda src, out, overwrite: convert_meta_to_hf(src, out, overwrite=overwrite)),
}
# The same commands' command lines, for the tests that interrupt a real process.
COMMAND_LINES: Dict[str, Callable[[Path, Path], list]] = {
    "reshard": lambda src, out: ["llama.cli.reshard", "--ckpt_dir", src, "--output_dir", out, "--model_parallel_size", 2, "--overwrite", True],
    "hf-to-meta": lambda src, out: ["llama.cli.convert", src, out, "--force", "--notokenizer"],
}


@pytest.fixture
def source(request, tmp_path, small_meta_template, small_hf_template) -> Path:
    """tmp_path/model: a copy of the command's kind of source, beside a notes file of the user's."""
    kind = WRITERS[request.node.callspec.params["command"]][0]
    (tmp_path / "notes.txt").write_text("mine")
    return Path(shutil.copytree(small_meta_template if kind == "meta" else small_hf_template, tmp_path / "model"))


def write(command: str, src: Path, out: Path, overwrite: bool = False) -> Path:
    return WRITERS[command][1](src, out, overwrite)


def snapshot(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def is_complete(folder: Path) -> bool:
    """A Meta folder with its checklist verifying, or a Hugging Face folder with config and weights."""
    if (folder / "params.json").is_file():
        return (folder / "checklist.chk").is_file() and subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=folder, capture_output=True).returncode == 0
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- outputs that overlap the source ---


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("where", ["the source", "the source's parent", "inside the source", "a link to the source"])
def test_an_output_overlapping_the_source_is_refused_and_nothing_is_touched(command, where, source, tmp_path):
    outputs = {
        "the source": source,
        "the source's parent": tmp_path,
        "inside the source": source / "out",
        "a link to the source": tmp_path / "link",
    }
    (tmp_path / "link").symlink_to(source)
    before, notes = snapshot(source), (tmp_path / "notes.txt").read_text()
    with pytest.raises(ValueError, match=r"output folder .*(is the source|holds the source|lies inside the source)"):
        write(command, source, outputs[where], overwrite=True)
    assert snapshot(source) == before and (tmp_path / "notes.txt").read_text() == notes


# --- replacing an existing output folder ---


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_symlinked_output_folder_is_replaced_through_its_link(command, source, tmp_path):
    real, link = tmp_path / "elsewhere" / "out", tmp_path / "out"
    write(command, source, real)
    (real / "old-notes.txt").write_text("replaced")
    link.symlink_to(real)
    write(command, source, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert is_complete(real) and not (real / "old-notes.txt").exists()
    assert leftovers(real.parent) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", list(WRITERS))
def test_an_old_folder_that_cannot_be_fully_deleted_leaves_the_new_one_in_place_and_is_named(command, source, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    write(command, source, out)
    rmtree = shutil.rmtree

    def half_rmtree(path, *args, **kwargs):
        if ".partial-" in Path(path).name:
            return rmtree(path, *args, **kwargs)
        sorted(Path(path).iterdir())[0].unlink()  # some files go, then one will not
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(shutil, "rmtree", half_rmtree)
    write(command, source, out, overwrite=True)
    assert is_complete(out)
    [aside] = leftovers(tmp_path)
    assert str(tmp_path / aside) in caplog.text and "remove it by hand" in caplog.text


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_failed_swap_puts_the_old_folder_back(command, source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(command, source, out)
    before = snapshot(out)
    rename = os.rename

    def failing_rename(src, dst, *args, **kwargs):
        if ".partial-" in Path(src).name:
            raise OSError(errno.EIO, "Input/output error (injected)", str(src))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        write(command, source, out, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_read_only_parent_is_refused_naming_the_output_folder_and_the_fix(command, source, tmp_path, read_only):
    out = tmp_path / "locked" / "out"
    out.parent.mkdir()
    read_only(out.parent)
    with pytest.raises(PermissionError, match="writable") as error:
        write(command, source, out)
    assert str(out) in str(error.value) and ".partial-" not in str(error.value)
    assert list(out.parent.iterdir()) == []


# --- what earlier runs left behind ---


@pytest.mark.parametrize("command", ["reshard"])
def test_a_staging_folder_whose_writer_still_runs_is_left_alone(command, source, tmp_path):
    live = tmp_path / ".out.partial-1"
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as its writer holds it
    try:
        write(command, source, tmp_path / "out")
    finally:
        os.close(lock)
    assert live.is_dir() and is_complete(tmp_path / "out")


@pytest.mark.parametrize("command", ["reshard"])
def test_a_folder_a_killed_run_had_moved_aside_is_moved_back(command, source, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".out.old-{dead.pid}"  # killed between its two renames: no out, the old one aside
    aside.mkdir()
    (aside / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write(command, source, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


# --- a real process interrupted while it writes ---


def start_and_stop_while_writing(command: str, src: Path, out: Path) -> subprocess.Popen:
    """The command line of `command` as a process stopped (SIGSTOP) in the middle of its first shard."""
    argv = [sys.executable, str(ROOT / "tests" / "stop_while_writing.py"), *map(str, COMMAND_LINES[command](src, out))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    guard = threading.Timer(120, proc.kill)  # a process that never stops fails the test instead of hanging it
    guard.start()
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    guard.cancel()
    assert os.WIFSTOPPED(status), f"{command} ended before writing: {proc.stderr.read().decode()}"
    return proc


@pytest.fixture
def old_output(request, source, tmp_path) -> Path:
    """tmp_path/out: an earlier, complete output of the command, which the interrupted run was replacing."""
    return write(request.node.callspec.params["command"], source, tmp_path / "out")


@pytest.mark.parametrize("command", list(COMMAND_LINES))
def test_kill_9_while_writing_leaves_the_old_folder_as_it_was(command, source, old_output):
    before = snapshot(old_output)
    proc = start_and_stop_while_writing(command, source, old_output)
    proc.kill()
    proc.wait()
    assert snapshot(old_output) == before


@pytest.mark.parametrize("command", list(COMMAND_LINES))
def test_the_next_run_removes_a_killed_runs_staging_folder_and_names_it(command, source, old_output, tmp_path, caplog):
    proc = start_and_stop_while_writing(command, source, old_output)
    proc.kill()
    proc.wait()
    stale = tmp_path / f".out.partial-{proc.pid}"
    assert stale.is_dir()
    write(command, source, old_output, overwrite=True)
    assert not stale.exists() and leftovers(tmp_path) == []
    assert str(stale) in caplog.text and "no longer runs" in caplog.text


@pytest.mark.parametrize("command", list(COMMAND_LINES))
def test_sigterm_while_writing_removes_the_staging_folder_and_keeps_the_old_one(command, source, old_output, tmp_path):
    before = snapshot(old_output)
    proc = start_and_stop_while_writing(command, source, old_output)
    proc.send_signal(signal.SIGTERM)  # pending until the process runs again
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=120) != 0
    assert snapshot(old_output) == before and leftovers(tmp_path) == []
