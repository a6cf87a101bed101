"""Local paths and URIs (s3://, gs://) as pyarrow filesystems; S3 endpoints from AWS variables."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from raytrain_vae.config import UserError, is_uri

# pyarrow ignores these (checked with pyarrow 26): S3-compatible servers (MinIO, Ceph, moto) are
# reached through them, so they are passed on as endpoint_override + scheme. The first set wins.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
# With a custom endpoint and no region set: a fixed one, else pyarrow asks AWS for the bucket's.
DEFAULT_REGION = "us-east-1"
# Against a custom endpoint: seconds to connect, seconds without a byte before a request is given
# up (curl's low-speed limit on Linux), and tries in all. A refused connection fails in about 1 s,
# a silent server in about 3 x 10 s. (The SDK's defaults are 1 s, 3 s and 3 tries.)
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3
# Query parameters whose values are never shown in an error line.
SECRET_PARAMETERS = frozenset({"access_key", "secret_key", "session_token"})
MESSAGE_LIMIT = 300
ACCESS_DENIED = "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
_DENIED_CODES = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")
_DENIED_CODES += ("INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN", "AccessDenied")
_MISSING_CODES = ("NO_SUCH_KEY", "NO_SUCH_BUCKET", "RESOURCE_NOT_FOUND", "Path does not exist")


class NoFilesError(UserError):
    """A folder that exists but holds no file of the kind asked for."""


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `path`, and the path within it.

    A local path (~ expanded, made absolute) gives a LocalFileSystem; a URI gives what pyarrow's
    FileSystem.from_uri makes of it, except that an s3:// URI without an endpoint_override
    query parameter is sent to the endpoint in AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL when
    one is set (region from AWS_REGION / AWS_DEFAULT_REGION, else us-east-1), with bounded
    timeouts and retries. Credentials are left to pyarrow (the standard AWS variables and files).
    Raises UserError (one line, naming the path) for a URI pyarrow cannot use."""
    filesystem, inner, _ = _resolve(path)
    return filesystem, inner


def storage_filesystem(path: str) -> pafs.FileSystem | None:
    """The filesystem to hand to Ray (RunConfig(storage_filesystem=...), Ray Data's filesystem=)
    for `path`: None for a local path, a non-S3 URI, or an s3:// URI while no endpoint variable
    is set (Ray then resolves the URI itself, as it always did); else the S3FileSystem that
    filesystem_for builds. Ray Train wants the path within it (filesystem_for's second value)."""
    if not is_uri(path) or urlsplit(path).scheme.lower() != "s3" or _env_endpoint() is None:
        return None
    return filesystem_for(path)[0]


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train and Tune: the path as it is, or, where
    our code must build the filesystem (an S3 endpoint from the environment), the filesystem
    and the path inside it (Ray refuses a URI beside a filesystem)."""
    filesystem = storage_filesystem(path)
    return (path, None) if filesystem is None else (filesystem_for(path)[1], filesystem)


def reported_location(storage_path: str, reported: str) -> str:
    """A path Ray reported for something under `storage_path` (a checkpoint), in the form a user
    can pass back: Ray reports paths inside the storage's filesystem, without the URI's scheme
    or query (`bucket/runs/r/checkpoint_x` for `s3://bucket/runs?endpoint_override=h`), so
    under URI storage they become URIs again (`s3://bucket/runs/r/checkpoint_x?endpoint_...`)."""
    if not is_uri(storage_path) or is_uri(reported):
        return reported
    parts = urlsplit(storage_path)
    inner = reported if parts.scheme.lower() == "file" else reported.lstrip("/")
    return f"{parts.scheme}://{inner}" + (f"?{parts.query}" if parts.query else "")


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every file under the folder `path` (recursively), or `path` itself when it is a file, whose
    name ends with one of `suffixes` (case-insensitive), sorted. Names in the form of `path`: a
    URI gives URIs (its query parameters kept), a local path gives absolute local paths. Files
    and folders below `path` whose names start with '.' or '_' are skipped.
    Raises UserError when `path` cannot be read or holds no such file."""
    filesystem, inner, endpoint = _resolve(path)
    wanted = tuple(suffix.lower() for suffix in suffixes)
    with _user_errors(path, endpoint):
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise UserError(_not_found(filesystem, inner, path))
        if info.type == pafs.FileType.File:
            if not info.base_name.lower().endswith(wanted):
                raise UserError(_line(f"{_shown(path)}: not a {_or_list(suffixes)} file"))
            return [path if is_uri(path) else inner]
        base = inner.rstrip("/") or inner  # a local "/" stays "/"
        found = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    names = []
    for entry in found:
        relative = entry.path[len(base) :].lstrip("/")
        hidden = any(part[:1] in (".", "_") for part in relative.split("/"))
        if entry.type == pafs.FileType.File and not hidden and relative.lower().endswith(wanted):
            names.append(_child(path, inner, relative))
    if not names:
        raise NoFilesError(_line(f"{_shown(path)}: no {_or_list(suffixes)} files"))
    return sorted(names)


def read_bytes(path: str) -> bytes:
    """The whole content of the file `path` (local or URI). Raises UserError (one line, naming
    the path) when it cannot be read."""
    filesystem, inner, endpoint = _resolve(path)
    with _user_errors(path, endpoint):
        try:
            with filesystem.open_input_stream(inner) as stream:
                return stream.read()
        except FileNotFoundError:
            raise UserError(_not_found(filesystem, inner, path)) from None


def path_exists(path: str) -> bool:
    """Whether a file or folder exists at `path` (local or URI), without listing it. Raises
    UserError when it cannot be asked."""
    filesystem, inner, endpoint = _resolve(path)
    with _user_errors(path, endpoint):
        return filesystem.get_file_info(inner).type != pafs.FileType.NotFound


def file_names_under(path: str) -> list[str] | None:
    """The names, relative to the folder `path` (local or URI), of every file below it, sorted;
    None where nothing exists at `path`. Raises UserError when it cannot be read."""
    filesystem, inner, endpoint = _resolve(path)
    with _user_errors(path, endpoint):
        if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
            return None
        base = inner.rstrip("/") or inner
        found = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(e.path[len(base) :].lstrip("/") for e in found if e.type == pafs.FileType.File)


def delete_folder(path: str) -> None:
    """Delete the folder `path` (local or URI) and everything below it. Raises UserError when it
    cannot."""
    filesystem, inner, endpoint = _resolve(path)
    with _user_errors(path, endpoint):
        filesystem.delete_dir(inner)


def _resolve(path: str) -> tuple[pafs.FileSystem, str, str | None]:
    """filesystem_for's answer, and the custom S3 endpoint used (None: none, or not S3)."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), None
    parts = urlsplit(path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {key for key, _ in query}
    endpoint = dict(query).get("endpoint_override")
    if parts.scheme.lower() == "s3" and endpoint is None and (env := _env_endpoint()):
        endpoint, scheme = env
        query.append(("endpoint_override", endpoint))
        if "scheme" not in given:
            query.append(("scheme", scheme))
    if parts.scheme.lower() == "s3" and endpoint is not None and "region" not in given:
        query.append(("region", _env_region()))
    with _user_errors(path, endpoint):
        filesystem, inner = pafs.FileSystem.from_uri(
            urlunsplit(parts._replace(query=urlencode(query)))
        )
    if isinstance(filesystem, pafs.S3FileSystem) and endpoint is not None:
        # Rebuilt from pyarrow's own pickled options (what Ray ships to its workers), with
        # bounded timeouts and retries: a dead endpoint fails in seconds, not minutes.
        filesystem = _with_bounded_waits(filesystem)
    return filesystem, inner, endpoint


def _with_bounded_waits(filesystem: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem with bounded timeouts and retries. pyarrow takes them only in
    the constructor, so it is rebuilt from the options it pickles itself with; should that
    layout change, the filesystem is kept as pyarrow made it (its own, longer waits)."""
    try:
        options = dict(filesystem.__reduce__()[1][0])
        options.update(connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S)
        retries = pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS)
        return pafs.S3FileSystem(**options, retry_strategy=retries)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return filesystem


def _env_endpoint() -> tuple[str, str] | None:
    """(host:port, scheme) from the first endpoint variable set, or None."""
    for name in ENDPOINT_VARIABLES:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        parts = urlsplit(value)
        if (
            parts.scheme.lower() not in ("http", "https")
            or not parts.netloc
            or "@" in parts.netloc
            or parts.path not in ("", "/")
            or parts.query
        ):
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise UserError(
                _line(f"{name}={shown!r}: expected http://host:port or https://host:port")
            )
        return parts.netloc, parts.scheme.lower()
    return None


def _env_region() -> str:
    """The region from the first region variable set, else DEFAULT_REGION."""
    for name in REGION_VARIABLES:
        if value := os.environ.get(name, "").strip():
            return value
    return DEFAULT_REGION


def _child(path: str, inner: str, relative: str) -> str:
    """The name of `relative` (below the folder `path`) in the form of `path`."""
    if not is_uri(path):
        return os.path.join(inner, relative)
    parts = urlsplit(path)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(relative)))


def _not_found(filesystem: pafs.FileSystem, inner: str, path: str) -> str:
    """The error line for a path that does not exist: names a missing S3 bucket as such."""
    bucket = inner.split("/", 1)[0]
    if isinstance(filesystem, pafs.S3FileSystem) and (
        bucket == inner or filesystem.get_file_info(bucket).type == pafs.FileType.NotFound
    ):
        return _line(f"{_shown(path)}: no such bucket {bucket!r}")
    return _line(f"{_shown(path)}: no such file or folder")


@contextmanager
def _user_errors(path: str, endpoint: str | None) -> Iterator[None]:
    """Turns pyarrow's and the OS's errors into a one-line UserError that names the path."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, NotImplementedError, pa.ArrowException) as exc:
        raise UserError(_line(f"{_shown(path)}: {_reason(exc, endpoint)}")) from exc


def _reason(exc: BaseException, endpoint: str | None) -> str:
    """What went wrong, in a few words, for an error line."""
    text = str(exc)
    if any(code in text for code in _DENIED_CODES):
        return ACCESS_DENIED
    if "NO_SUCH_BUCKET" in text:
        return "no such bucket"
    if isinstance(exc, FileNotFoundError) or any(code in text for code in _MISSING_CODES):
        return "no such file or folder"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError) or "is a directory" in text:
        return "is a folder, not a file"
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        where = endpoint or "(the provider's default)"
        detail = re.search(r"curlCode: \d+, ([^;]+)", text)
        return f"cannot reach the storage endpoint {where}" + (
            f" ({detail.group(1).strip()})" if detail else ""
        )
    if isinstance(exc, ValueError | NotImplementedError):
        return f"not a usable storage path ({text})"
    return text


def _shown(path: str) -> str:
    """`path` as an error line shows it, cut to 150 characters (_line masks credentials)."""
    return path if len(path) <= 150 else path[:147] + "..."


def _line(text: str) -> str:
    """One line of at most MESSAGE_LIMIT characters, credentials in URIs masked (the path's, and
    any that pyarrow's message repeats): user:secret@ dropped, secret query values as ***."""
    text = re.sub(r"(://)[^/@\s]*@", r"\1", " ".join(text.split()))
    text = re.sub(rf"\b({'|'.join(SECRET_PARAMETERS)})=[^&\s'\"]*", r"\1=***", text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _or_list(suffixes: tuple[str, ...]) -> str:
    """('.png', '.jpg', '.jpeg') -> '.png, .jpg or .jpeg'."""
    names = list(suffixes) or ["(no suffix)"]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
