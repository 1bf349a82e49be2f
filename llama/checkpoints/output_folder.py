"""The one way commands write a checkpoint folder: staged beside the target, swapped in whole.

    with staged_output("llama-2-70b-mp2/", sources=["llama-2-70b/"], overwrite=True) as staging:
        ...write every file into staging...
        write_checklist(staging)  # last: a folder with checklist.chk is complete

A crash, kill -9, Ctrl-C or SIGTERM leaves the target as it was: the new files live in
`.NAME.partial-PID` until the block succeeds, then two renames put them in place (the old folder
goes to `.NAME.old-PID` and is removed last, or moved back if the swap fails). The next run
removes staging folders whose writer is gone and says so. A symlinked target is written through:
its link stays and the folder it points to is replaced; nothing is deleted through a link.
"""

import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class OutputFolderError(ValueError):
    """The output folder would overlap the source, or is no place for a folder."""


@contextlib.contextmanager
def staged_output(
    target: PathLike, *, sources: Sequence[PathLike], overwrite: bool, overwrite_flag: str = "overwrite=True"
) -> Iterator[Path]:
    """A fresh staging folder beside target that replaces target when the block succeeds.

    On any exception, Ctrl-C or SIGTERM the staging folder is removed and target is untouched.
    overwrite_flag is how the caller's users ask to replace a non-empty target (named in errors).

    Raises OutputFolderError if target is, holds or lies inside a source (symlinks resolved),
    FileExistsError if target is a file, or a non-empty folder and not overwrite,
    PermissionError if no folder can be created beside target.
    """
    folder = _checked_folder(target, sources)
    with _terminate_as_interrupt():
        _remove_stale_staging(folder)  # first: it may move back a folder that a killed run had moved aside
        _check_replaceable(folder, target, overwrite, overwrite_flag)
        staging = _make_staging(folder, target)
        lock = _lock(staging)  # held until the end: tells later runs this folder has a live writer
        try:
            yield staging
            _swap_in(staging, folder)
        except BaseException:
            _remove(staging)
            raise
        finally:
            _unlock(lock)


def _checked_folder(target: PathLike, sources: Sequence[PathLike]) -> Path:
    """The real folder target names (symlinks resolved), if it does not overlap a source."""
    try:
        folder = Path(target).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise OutputFolderError(f"output folder {str(target)!r} cannot be resolved ({e}); pass a plain folder path") from e
    if not folder.name:
        raise OutputFolderError(f"output folder {str(target)!r} is a filesystem root; pass a folder to create")
    for source in sources:
        real = Path(source).resolve()
        if real == folder:
            raise OutputFolderError(f"output folder {str(target)!r} is the source {str(source)!r}; choose another output folder")
        if folder in real.parents:
            raise OutputFolderError(
                f"output folder {str(target)!r} holds the source {str(source)!r}, which replacing it would delete; choose another output folder"
            )
        if real in folder.parents:
            raise OutputFolderError(f"output folder {str(target)!r} lies inside the source {str(source)!r}; choose an output folder outside it")
    return folder


def _check_replaceable(folder: Path, target: PathLike, overwrite: bool, overwrite_flag: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"output path {str(target)!r} is a file; pass a folder to create")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(target)!r} exists and is not empty; pass {overwrite_flag} to replace it, or choose another")


def write_checklist(folder: Path) -> None:
    """checklist.chk as Meta ships it: `<md5>  <filename>` for every other file in the folder."""
    lines = [f"{_md5(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file() and p.name != "checklist.chk"]
    (folder / "checklist.chk").write_text("".join(lines))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _staging_name(folder: Path, kind: str, pid: int) -> Path:
    return folder.parent / f".{folder.name}.{kind}-{pid}"


def _make_staging(folder: Path, target: PathLike) -> Path:
    staging = _staging_name(folder, "partial", os.getpid())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(
            f"cannot write the output folder {str(target)!r}: no new folder can be created in {str(folder.parent)!r} "
            f"({e.strerror}); make that folder writable or choose an output folder elsewhere"
        ) from e
    return staging


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename staging to folder; an existing folder is moved aside first and removed only after."""
    with _signals_blocked():
        if not folder.exists():
            staging.rename(folder)
            return
        old = _staging_name(folder, "old", os.getpid())
        lock = _lock(folder)  # so that a concurrent run's clean-up leaves the aside folder alone
        try:
            folder.rename(old)
            try:
                staging.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
        finally:
            _unlock(lock)
    try:
        shutil.rmtree(old)
    except OSError as e:
        logger.warning("Wrote %s, but could not fully remove the folder it replaced, now %s (%s); remove it by hand", folder, old, e)


def _remove_stale_staging(folder: Path) -> None:
    """Remove (and name) the staging folders of earlier runs for folder whose writer no longer runs.

    A folder moved aside by a writer that died before the new one was in place is moved back.
    """
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(partial|old)-(\d+)")
    for path in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*-*")):
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if _has_live_writer(path, pid):
            logger.info("Leaving %s alone: process %d is still writing it", path, pid)
        elif kind == "old" and not folder.exists():
            path.rename(folder)
            logger.warning("Moved %s back to %s: process %d stopped while replacing it", path, folder, pid)
        else:
            logger.warning("Removing %s, left behind by process %d, which no longer runs", path, pid)
            try:
                shutil.rmtree(path)
            except OSError as e:
                logger.warning("Could not fully remove %s (%s); remove it by hand", path, e)


def _lock(folder: Path) -> Optional[int]:
    """An open descriptor of folder holding an exclusive flock; None if folder cannot be opened.
    Where the filesystem has no locks, later runs judge by the PID in the name instead."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def _has_live_writer(path: Path, pid: int) -> bool:
    """Whether the process that made path still holds it: its lock, or where locks fail, its PID."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return _pid_alive(pid)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return _pid_alive(pid)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the staging folder is cleaned up on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its own handler stays
        return

    def interrupt(signum: int, frame: Optional[object]) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the renames of a swap are done (delivered right after)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
