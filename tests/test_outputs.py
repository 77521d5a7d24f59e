"""Output folders and files: refused when they hold the user's work, staged up front, swapped in whole."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lrpq.outputs import OutputError, check_output_dir, replace_text, signals_held, staged_dir, staged_file


def always(_: Path) -> bool:
    return True


def never(_: Path) -> bool:
    return False


def hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home with a working directory inside it (the cwd) holding a user file."""
    home = tmp_path / "home" / "user"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (".", "the current directory"),
        ("work", "the current directory"),  # given as an absolute path below
        ("../work/sub/..", "the current directory"),
        ("..", "your home directory"),
        ("../..", "a parent of the current directory"),
        ("link-to-cwd", "the current directory"),
        ("/", "a parent of the current directory"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_folders_holding_the_users_work_are_refused_whatever_the_flags(
    home: Path, target: str, reason: str, overwrite: bool
) -> None:
    work = home / "work"
    if target == "work":
        target = str(work)
    if target == "link-to-cwd":
        (home / "link").symlink_to(work)
        target = str(home / "link")
    with pytest.raises(OutputError, match=reason), staged_dir(target, what="run directory", overwrite=overwrite):
        pytest.fail("the block must not run")
    assert [path.name for path in work.iterdir()] == ["notes.txt"]
    assert hidden(home) == []


def test_home_and_its_parents_are_refused_from_anywhere(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="your home directory"):
        check_output_dir(home, what="run directory", overwrite=True, replaceable=always)
    with pytest.raises(OutputError, match="a parent of your home directory"):
        check_output_dir(home.parent, what="run directory", overwrite=True, replaceable=always)


def test_a_parent_of_the_current_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(OutputError, match="a parent of the current directory"):
        check_output_dir(tmp_path / "a", what="run directory", overwrite=True, replaceable=always)


@pytest.mark.parametrize("git", ["folder", "file"])  # a clone has a .git folder, a worktree a .git file
def test_a_repository_root_is_refused(tmp_path: Path, git: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".git").mkdir() if git == "folder" else (repo / ".git").write_text("gitdir: elsewhere")
    with pytest.raises(OutputError, match=r"a repository root \(it holds \.git\)"):
        check_output_dir(repo, what="run directory", overwrite=True, replaceable=always)
    assert (repo / ".git").exists()


def test_an_existing_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("mine")
    with pytest.raises(OutputError, match="is an existing file"), staged_dir(tmp_path / "results.csv", what="x"):
        pytest.fail("the block must not run")
    assert [path.name for path in tmp_path.iterdir()] == ["results.csv"]


def test_overwrite_replaces_only_what_replaceable_recognises(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists; choose another --out or pass --overwrite"):
        check_output_dir(target, what="run directory", replaceable=always)
    with pytest.raises(OutputError, match="not a run directory, and --overwrite only replaces a run directory"):
        check_output_dir(target, what="run directory", overwrite=True, replaceable=never)
    with pytest.raises(OutputError, match="already exists and is not empty"):  # no --overwrite at all
        check_output_dir(target, what="relevance report", overwrite=True)
    assert check_output_dir(target, what="run directory", overwrite=True, replaceable=always) == target.resolve()
    assert (target / "mine.txt").read_text() == "mine"  # checking touches nothing


def test_replacing_moves_the_old_folder_aside_until_the_new_one_is_in(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target, what="run directory", overwrite=True, replaceable=always) as staging:
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # the old run stays in place while the new one is written
    assert [path.name for path in target.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    rename = Path.rename

    def failing_rename(self: Path, destination: Path) -> Path:
        if self.name.startswith(".run.") and not self.name.startswith(".run.old-"):  # the staging folder
            raise OSError(28, "No space left on device")
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with (
        pytest.raises(OutputError, match=r"cannot write .*No space left on device"),
        staged_dir(target, what="run directory", overwrite=True, replaceable=always) as staging,
    ):
        (staging / "new.txt").write_text("new")
    assert [path.name for path in target.iterdir()] == ["old.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_a_target_filled_while_the_block_ran_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with pytest.raises(OutputError, match="already exists"), staged_dir(target, what="run directory") as staging:
        (staging / "new.txt").write_text("new")
        target.mkdir()
        (target / "mine.txt").write_text("mine")
    assert [path.name for path in target.iterdir()] == ["mine.txt"]
    assert hidden(tmp_path) == []


def test_failure_removes_the_staging_folder_and_the_folders_made_for_it(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), staged_dir(tmp_path / "a" / "b" / "run", what="x") as staging:
        assert staging.parent == tmp_path / "a" / "b"
        (staging / "partial.bin").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_place_fails_before_the_block(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with (
        pytest.raises(OutputError, match=r"cannot write .*Not a directory"),
        staged_dir(tmp_path / "file" / "run", what="x"),
    ):
        pytest.fail("the block must not run")
    with pytest.raises(OutputError, match=r"cannot write .*Not a directory"), staged_file(tmp_path / "file" / "r.json"):
        pytest.fail("the block must not run")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_before_the_block(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"), staged_dir(locked / "run", what="x"):
            pytest.fail("the block must not run")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_staged_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with staged_dir(tmp_path / "run", what="x") as staging:
            save_file({"x": torch.zeros(1)}, str(staging / "t.safetensors"))  # safetensors writes 0600
            (staging / "sub").mkdir()
            (staging / "sub" / "a.txt").write_text("a")
        with staged_file(tmp_path / "result.json") as staging:
            staging.write_text("{}")
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    for folder in (run, run / "sub"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for file in (run / "t.safetensors", run / "sub" / "a.txt", tmp_path / "result.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask


def test_staged_file_replaces_the_old_file_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="failed"), staged_file(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".result.json.")
        staging.write_text("half")
        raise ValueError("failed")
    assert target.read_text() == "old"
    with staged_file(target) as staging:
        staging.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(OutputError, match="is a folder"), staged_file(tmp_path):
        pytest.fail("the block must not run")


def test_replace_text_makes_folders_and_leaves_no_staging_file(tmp_path: Path) -> None:
    target = tmp_path / "results" / "deep" / "rows.json"
    replace_text(target, "first")
    replace_text(target, "second")
    assert target.read_text() == "second"
    assert [path.name for path in target.parent.iterdir()] == ["rows.json"]


def test_replace_text_keeps_the_old_text_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "rows.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        replace_text(target, None)  # type: ignore[arg-type]  # the write itself fails, after staging
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["rows.json"]


@pytest.fixture
def other_thread() -> Iterator[None]:
    """A second live thread, as torch's workers are: the kernel may hand it a signal sent to the process."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    yield
    done.set()
    thread.join()


@pytest.mark.usefixtures("other_thread")
def test_signals_held_delivers_ctrl_c_after_the_block() -> None:
    steps = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background runner ignores Ctrl-C
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # time for any thread to take the signal and Python to act on it
                steps.append("still running")  # held back: the block is not cut short
            steps.append("never reached")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["still running"]


@pytest.mark.usefixtures("other_thread")
def test_nested_signals_held_deliver_sigterm_once_to_the_outer_handler_at_the_outer_end() -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, _: received.append(number))
    try:
        with signals_held():
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            assert received == []
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
