"""Outputs the project writes: vetted paths, atomic files and marked, atomically swapped folders."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raytrain_vae.config import UserError

# Every output folder carries this file; only a folder that has it, with the same kind, is ever
# replaced, so a mistyped path never costs a user's own files.
MARKER = ".raytrain_vae-output"
PACKAGE_CHECKOUT = Path(__file__).resolve().parents[1]


class OutputError(UserError):
    """An output path that must not or cannot be written."""


def _protected_reason(path: Path) -> str | None:
    """Why a resolved folder may never be an output (it would swallow something else), or None."""
    if path == Path(path.anchor):
        return "is the filesystem root"
    guarded = {
        Path.cwd().resolve(): "the current directory",
        Path.home().resolve(): "your home directory",
        PACKAGE_CHECKOUT: "raytrain_vae's own checkout",
        Path(sys.prefix).resolve(): "the Python environment",
    }
    for place, name in guarded.items():
        if path == place or path in place.parents:
            return "is " + name if path == place else "holds " + name
    return None


def resolve_local(text: str | Path, what: str) -> Path:
    """A local path given by the user, ~ expanded and made absolute; empty or NUL refused."""
    text = str(text)
    if not text.strip():
        raise OutputError(f"{what}: empty path")
    if "\0" in text:
        raise OutputError(f"{what}: path contains a NUL byte")
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unknown ~user
        raise OutputError(f"{what} {text}: cannot resolve ({exc})") from None


def marker_kind(folder: Path) -> str | None:
    """The kind of raytrain_vae output a folder holds, or None if it holds none."""
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_dir(text: str | Path, what: str, kind: str, replace: bool = True) -> Path:
    """The resolved output folder, refused unless writing it loses nothing the project did not
    write: absent, empty, or (with replace) a previous output of the same kind."""
    path = resolve_local(text, what)
    reason = _protected_reason(path)
    if reason:
        raise OutputError(f"{what} {path} {reason}: refusing to replace it; name a new folder")
    if not path.exists() and not path.is_symlink():
        _check_creatable(path, what)
        return path
    if not path.is_dir() or path.is_symlink():
        raise OutputError(f"{what} {path} exists and is not a folder: name a new folder")
    try:
        empty = not any(path.iterdir())
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot list it ({exc.strerror or exc})") from None
    if empty:
        return path
    found = marker_kind(path)
    if found != kind:
        held = f"a raytrain_vae {found} output" if found else "files raytrain_vae did not write"
        raise OutputError(
            f"{what} {path} holds {held}: refusing to replace it; name a new or empty folder"
        )
    if not replace:
        raise OutputError(f"{what} {path} exists: pass --overwrite to replace it")
    return path


def _check_creatable(path: Path, what: str) -> None:
    """The nearest existing folder above a new output is a folder we may write in."""
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{what} {path}: not writable ({above} is not a folder)")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: not writable ({above} is read-only to you)")


def _make_shareable(folder: Path) -> None:
    # mkdtemp makes a private 0700 folder; an output is meant to be shared like any other file.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


@contextmanager
def staged_dir(target: Path, what: str, kind: str) -> Iterator[Path]:
    """A temporary sibling of target to fill; on success it is marked and swapped in for target
    (checked again, as check_output_dir, just before), on any failure removed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"{what} {target}: not writable ({exc.strerror or exc})") from None
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        _make_shareable(tmp)
        check_output_dir(target, what, kind)  # someone may have filled it since
        _swap_in(tmp, target)
    except OSError as exc:  # disk full, quota, permissions: the previous output is untouched
        raise OutputError(f"cannot write {what} {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, old / target.name)
        try:
            os.replace(new, target)
        except OSError:
            os.replace(old / target.name, target)  # put the previous output back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(text: str | Path, what: str, owned_by: str) -> Path:
    """The resolved path of an output file; an existing one is replaced only if it is a JSON
    object this project wrote (its "written_by" is owned_by)."""
    path = resolve_local(text, what)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: name a file")
    if path.exists():
        try:
            ours = json.loads(path.read_bytes()).get("written_by") == owned_by
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputError(
                f"{what} {path} exists and was not written by {owned_by}: refusing to replace "
                "it; name a new file"
            )
    else:
        _check_creatable(path, what)  # before the work: a long evaluation, then no place to put it
    return path


def write_file_atomically(path: Path, data: str | bytes, what: str) -> None:
    """Write a whole file through a temporary sibling: readers see the old file or the new one,
    and a failure leaves neither a partial file nor a temporary one behind."""
    payload = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
