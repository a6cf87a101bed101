"""Output paths: only the project's own earlier outputs are ever replaced; writes are atomic and
leave nothing behind on failure. No Ray."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import raytrain_vae.outputs as outputs
from raytrain_vae.config import UserError
from raytrain_vae.outputs import (
    MARKER,
    OutputError,
    check_output_dir,
    check_output_file,
    staged_dir,
    write_file_atomically,
)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): the filesystem, to compare."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def fill(target: Path, kind: str) -> None:
    with staged_dir(target, "out", kind) as tmp:
        (tmp / "data.txt").write_text(kind)


def test_a_folder_of_the_users_files_is_refused_and_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    fill(mine / "earlier-export", "export")  # an earlier export, one level down
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="files raytrain_vae did not write"):
        check_output_dir(mine, "export.dir", "export")
    with pytest.raises(OutputError, match="did not write"):
        fill(mine, "export")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("text", ["", "  ", ".", "./", "..", "~", "/", "a\0b"])
def test_protected_or_malformed_paths_are_refused(tmp_path, monkeypatch, text):
    work = tmp_path / "home" / "checkout"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(OutputError) as info:
        check_output_dir(text, "export.dir", "export", replace=True)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_the_checkout_and_its_parents_are_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is raytrain_vae's own checkout"):
        check_output_dir(outputs.PACKAGE_CHECKOUT, "--output", "generate", replace=True)
    # Its parent may also hold the current directory (a clone in /tmp): either reason will do.
    with pytest.raises(OutputError, match="holds (raytrain_vae's own checkout|the current dir)"):
        check_output_dir(outputs.PACKAGE_CHECKOUT.parent, "--output", "generate", replace=True)


def test_new_empty_and_own_outputs_are_accepted(tmp_path):
    assert check_output_dir(tmp_path / "new" / "out", "o", "export") == tmp_path / "new" / "out"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "o", "export") == tmp_path / "empty"
    fill(tmp_path / "ours", "export")
    assert check_output_dir(tmp_path / "ours", "o", "export") == tmp_path / "ours"


def test_an_output_of_another_kind_is_refused(tmp_path):
    fill(tmp_path / "model", "export")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="holds a raytrain_vae export output"):
        fill(tmp_path / "model", "images")  # pictures must never replace the model
    assert tree(tmp_path) == before


def test_without_overwrite_an_earlier_output_is_refused(tmp_path):
    fill(tmp_path / "out", "generate")
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(tmp_path / "out", "--output", "generate", replace=False)


def test_an_existing_file_is_refused_and_a_symlink_is_judged_by_its_target(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "file", "o", "export")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(OutputError, match="did not write"):
        check_output_dir(tmp_path / "link", "o", "export")


def test_replacing_swaps_the_whole_folder_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "out"
    fill(out, "export")
    (out / "stale.txt").write_text("from the first run")  # inside our own output: replaced
    fill(out, "export")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "data.txt"])
    assert json.loads((out / MARKER).read_text()) == {"kind": "export"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_while_staging_keeps_the_old_output_and_no_temporaries(tmp_path, error):
    fill(tmp_path / "out", "export")
    before = tree(tmp_path)
    with pytest.raises(type(error)), staged_dir(tmp_path / "out", "o", "export") as tmp:
        (tmp / "half.txt").write_text("half")
        raise error
    assert tree(tmp_path) == before


def test_a_full_disk_while_staging_is_one_line(tmp_path):
    with (
        pytest.raises(OutputError, match="No space left") as info,
        staged_dir(tmp_path / "out", "--output", "generate"),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_output_file_replaces_only_its_own_json(tmp_path):
    ours = tmp_path / "metrics.json"
    ours.write_text(json.dumps({"written_by": "raytrain_vae.evaluate", "neg_elbo": 1.0}))
    assert check_output_file(ours, "--output", "raytrain_vae.evaluate") == ours
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    (tmp_path / "README.md").write_text("# mine")
    for name in ("notes.json", "README.md"):
        with pytest.raises(OutputError, match="not written by"):
            check_output_file(tmp_path / name, "--output", "raytrain_vae.evaluate")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path, "--output", "raytrain_vae.evaluate")


def test_write_below_a_file_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    before = tree(tmp_path)
    with pytest.raises(UserError, match="cannot write --output") as info:
        write_file_atomically(tmp_path / "a-file" / "m.json", "{}", "--output")
    assert "\n" not in str(info.value)
    assert tree(tmp_path) == before


def test_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(outputs.os, "replace", refuse)
    with pytest.raises(OutputError, match="cross-device"):
        write_file_atomically(target, "new", "--output")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert target.read_text() == "old"
