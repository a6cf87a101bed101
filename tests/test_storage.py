"""raytrain_vae.storage against a real S3 server (moto, on loopback) and local folders: no Ray."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import S3Server, free_port

from raytrain_vae import storage
from raytrain_vae.config import UserError, child_path, load_config
from raytrain_vae.storage import (
    delete_folder,
    file_names_under,
    filesystem_for,
    list_files,
    path_exists,
    read_bytes,
    reported_location,
    storage_filesystem,
)

IMAGES = (".png", ".jpg", ".jpeg")
# Objects (or files) under a folder: the images list_files returns, and what it skips.
TREE = {
    "a.png": b"a",
    "sub/b.JPG": b"bb",
    "sub/deeper/c.jpeg": b"ccc",
    "notes.txt": b"not an image",
    ".hidden.png": b"hidden file",
    ".cache/d.png": b"hidden folder",
    "_tmp/e.png": b"underscore folder",
    "sub/_f.png": b"underscore file",
}
LISTED = ["a.png", "sub/b.JPG", "sub/deeper/c.jpeg"]


def error_line(raised: pytest.ExceptionInfo, *parts: str) -> str:
    """The UserError's message, checked: one line, <= 300 characters, no traceback, holding
    each of parts."""
    message = str(raised.value)
    assert "\n" not in message and len(message) <= 300 and "Traceback" not in message, message
    for part in parts:
        assert part in message, message
    return message


def write(path: str, data: bytes) -> None:
    """Writes a file through filesystem_for (the way callers of raytrain_vae.storage do)."""
    filesystem, inner = filesystem_for(path)
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(data)


def test_s3_round_trip(s3_server: S3Server):
    for key, data in TREE.items():
        write(s3_server.url(f"round/{key}"), data)
    # Written where the server's own client sees them.
    seen = s3_server.filesystem().get_file_info(
        pafs.FileSelector(f"{s3_server.bucket}/round", recursive=True)
    )
    assert {info.path for info in seen if info.type == pafs.FileType.File} == {
        f"{s3_server.bucket}/round/{key}" for key in TREE
    }
    expected = [s3_server.url(f"round/{key}") for key in LISTED]
    assert list_files(s3_server.url("round"), IMAGES) == expected
    assert list_files(s3_server.url("round/"), IMAGES) == expected
    assert list_files(s3_server.url("round/sub"), (".JPG",)) == [s3_server.url("round/sub/b.JPG")]
    for name in expected:
        assert read_bytes(name) == TREE[name.split("/round/", 1)[1]]
    # A file named directly is listed as itself, even when hidden.
    assert list_files(s3_server.url("round/.hidden.png"), IMAGES) == [
        s3_server.url("round/.hidden.png")
    ]
    # The bucket itself is a folder.
    assert s3_server.url("round/a.png") in list_files(f"s3://{s3_server.bucket}", IMAGES)


def test_s3_names_with_spaces_round_trip(s3_server: S3Server):
    s3_server.put("spaces/my image.png", b"spaced")
    [name] = list_files(s3_server.url("spaces"), IMAGES)
    assert name == s3_server.url("spaces/my%20image.png")
    assert read_bytes(name) == b"spaced"


def test_explicit_endpoint_override_in_the_uri(s3_server: S3Server, monkeypatch):
    s3_server.put("explicit/x.png", b"explicit")
    host = s3_server.endpoint.split("://", 1)[1]
    query = f"?endpoint_override={host}&scheme=http"
    folder = f"s3://{s3_server.bucket}/explicit{query}"
    # The URI's endpoint wins over the variable's (here: nobody listens there) ...
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert read_bytes(f"s3://{s3_server.bucket}/explicit/x.png{query}") == b"explicit"
    # ... and is kept in the names listed, so that they can be read back.
    assert list_files(folder, IMAGES) == [f"s3://{s3_server.bucket}/explicit/x.png{query}"]
    # Without any endpoint variable, the URI alone reaches the server.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert read_bytes(list_files(folder, IMAGES)[0]) == b"explicit"
    assert storage_filesystem(folder) is None


def test_a_run_folder_under_a_storage_path_with_its_endpoint_in_the_query(s3_server: S3Server):
    """The run folder's checks (new or resumed, empty or not, deleted) reach the server that
    the storage path's query names: the run's name goes into the path, not the query."""
    host = s3_server.endpoint.split("://", 1)[1]
    storage = f"s3://{s3_server.bucket}/runs?endpoint_override={host}&scheme=http"
    folder = load_config(None, [f"run.storage_path={storage}", "run.name=r1"]).run_folder()
    assert not path_exists(folder) and file_names_under(folder) is None
    write(child_path(folder, "sub", "x.txt"), b"x")
    with s3_server.filesystem().open_input_stream(f"{s3_server.bucket}/runs/r1/sub/x.txt") as f:
        assert f.read() == b"x"
    assert path_exists(folder) and file_names_under(folder) == ["sub/x.txt"]
    delete_folder(folder)
    assert not path_exists(folder)


REPORTED = [
    # (storage path, the path Ray reports for a checkpoint under it, what the user is shown)
    ("/runs", "/runs/r/checkpoint_1", "/runs/r/checkpoint_1"),
    ("s3://b/runs", "b/runs/r/checkpoint_1", "s3://b/runs/r/checkpoint_1"),
    (
        "s3://b/runs?endpoint_override=h:9&scheme=http",
        "b/runs/r/checkpoint_1",
        "s3://b/runs/r/checkpoint_1?endpoint_override=h:9&scheme=http",
    ),
    ("gs://b", "b/r/checkpoint_1", "gs://b/r/checkpoint_1"),
    ("file:///data/runs", "/data/runs/r/checkpoint_1", "file:///data/runs/r/checkpoint_1"),
    ("s3://b/runs", "s3://b/runs/r/checkpoint_1", "s3://b/runs/r/checkpoint_1"),
]


@pytest.mark.parametrize("storage, reported, shown", REPORTED)
def test_a_checkpoint_ray_reports_is_shown_in_the_storage_paths_form(storage, reported, shown):
    """Ray reports paths inside the storage's filesystem; under URI storage the user is given a
    URI that the commands taking --model (and Ray) accept again."""
    assert reported_location(storage, reported) == shown


def test_a_reported_checkpoint_reaches_the_server_its_storage_names(s3_server: S3Server):
    host = s3_server.endpoint.split("://", 1)[1]
    storage = f"s3://{s3_server.bucket}/runs?endpoint_override={host}&scheme=http"
    s3_server.put("runs/r/checkpoint_1/x.txt", b"x")
    shown = reported_location(storage, f"{s3_server.bucket}/runs/r/checkpoint_1")
    assert read_bytes(child_path(shown, "x.txt")) == b"x"


def test_s3_endpoint_variable_wins_over_the_general_one(s3_server: S3Server, monkeypatch):
    s3_server.put("specific/x.png", b"specific")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint + "/")
    assert read_bytes(s3_server.url("specific/x.png")) == b"specific"


def test_storage_filesystem(s3_server: S3Server, tmp_path, monkeypatch):
    assert storage_filesystem(str(tmp_path)) is None
    assert storage_filesystem(f"file://{tmp_path}") is None
    assert storage_filesystem("gs://some-bucket/runs") is None
    s3_server.put("runs/x.png", b"run")
    filesystem = storage_filesystem(s3_server.url("runs"))
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert filesystem.region == "us-east-1"
    assert filesystem.get_file_info(f"{s3_server.bucket}/runs/x.png").size == 3
    # Ray pickles it to its workers: the copy reaches the same server.
    copy = pickle.loads(pickle.dumps(filesystem))
    assert copy.get_file_info(f"{s3_server.bucket}/runs/x.png").size == 3
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage_filesystem(s3_server.url("runs")).region == "eu-west-3"
    assert filesystem_for(s3_server.url("runs?region=ap-south-1"))[0].region == "ap-south-1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage_filesystem(s3_server.url("runs")) is None


def test_missing_key(s3_server: S3Server):
    path = s3_server.url("missing/nothing.png")
    with pytest.raises(UserError) as raised:
        read_bytes(path)
    assert error_line(raised) == f"{path}: no such file or folder"
    with pytest.raises(UserError) as raised:
        list_files(s3_server.url("missing/"), IMAGES)
    assert error_line(raised) == f"{s3_server.url('missing/')}: no such file or folder"


def test_missing_bucket(s3_server: S3Server):
    for path in ("s3://no-such-bucket/data", "s3://no-such-bucket"):
        with pytest.raises(UserError) as raised:
            list_files(path, IMAGES)
        assert error_line(raised) == f"{path}: no such bucket 'no-such-bucket'"
    with pytest.raises(UserError) as raised:
        read_bytes("s3://no-such-bucket/x.png")
    error_line(raised, "s3://no-such-bucket/x.png: no such bucket")


def test_folder_without_images(s3_server: S3Server):
    s3_server.put("texts/a.txt", b"text")
    with pytest.raises(UserError) as raised:
        list_files(s3_server.url("texts"), IMAGES)
    assert error_line(raised) == f"{s3_server.url('texts')}: no .png, .jpg or .jpeg files"


def test_wrong_credentials(s3_server_with_iam: S3Server, monkeypatch):
    server = s3_server_with_iam
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    server.put("data/x.png", b"x")
    assert list_files(server.url("data"), IMAGES) == [server.url("data/x.png")]
    for key_id, secret in ((server.access_key, "wrong-secret"), ("AKIAUNKNOWN", server.secret_key)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for call, path in (
            (list_files, server.url("data")),
            (read_bytes, server.url("data/x.png")),
        ):
            with pytest.raises(UserError) as raised:
                call(path, IMAGES) if call is list_files else call(path)
            message = error_line(raised, "access denied", "AWS_SECRET_ACCESS_KEY")
            assert message.startswith(f"{path}: "), message
            assert secret not in message


def test_dead_endpoint_fails_fast(monkeypatch):
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for call in (lambda path: read_bytes(path), lambda path: list_files(path, IMAGES)):
        started = time.monotonic()
        with pytest.raises(UserError) as raised:
            call("s3://bucket/data/x.png")
        assert time.monotonic() - started < 8  # measured: 0.6 to 2.0 s (3 tries, jittered backoff)
        error_line(
            raised, "s3://bucket/data/x.png: cannot reach the storage endpoint", f"127.0.0.1:{port}"
        )


def test_bad_endpoint_variable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    with pytest.raises(UserError) as raised:
        filesystem_for("s3://bucket/x")
    error_line(raised, "AWS_ENDPOINT_URL='127.0.0.1:9000'", "http://host:port")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:secret@127.0.0.1:9000")
    with pytest.raises(UserError) as raised:
        storage_filesystem("s3://bucket/x")
    assert "secret" not in error_line(raised, "AWS_ENDPOINT_URL")
    assert storage_filesystem("gs://bucket/x") is None  # the S3 variable is not looked at


def test_unusable_uri_hides_secrets():
    for uri in ("s3://bucket/x?secret_key=hush&colour=blue", "s3://bucket/a b?secret_key=hush"):
        with pytest.raises(UserError) as raised:
            filesystem_for(uri)
        assert "hush" not in error_line(raised, "s3://bucket/", "not a usable storage path")
    with pytest.raises(UserError) as raised:
        filesystem_for("nosuchscheme://bucket/x")
    error_line(raised, "nosuchscheme://bucket/x: not a usable storage path")


def test_local_paths(tmp_path: Path, monkeypatch):
    folder = tmp_path / "images"
    for key, data in TREE.items():
        write(str(folder / key), data)
    expected = [str(folder / key) for key in LISTED]
    assert list_files(str(folder), IMAGES) == expected
    assert [read_bytes(name) for name in expected] == [TREE[key] for key in LISTED]
    # Relative and ~ paths come back absolute.
    monkeypatch.chdir(tmp_path)
    assert list_files("images", IMAGES) == expected
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list_files("~/images/", IMAGES) == expected
    filesystem, inner = filesystem_for("~/images")
    assert isinstance(filesystem, pafs.LocalFileSystem) and inner == str(folder)
    assert read_bytes("~/images/a.png") == b"a"
    assert list_files(str(folder / ".hidden.png"), IMAGES) == [str(folder / ".hidden.png")]
    # file:// URIs give file:// URIs.
    assert list_files(f"file://{folder}/sub", IMAGES) == [
        f"file://{folder}/sub/b.JPG",
        f"file://{folder}/sub/deeper/c.jpeg",
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_names_under_and_delete_folder(where, tmp_path: Path, request):
    """Every file below a folder (hidden ones too, relative names), None for nothing there;
    path_exists says so without listing; delete_folder removes the folder and all below it,
    leaving its neighbour."""
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        root = server.url("tree")
    else:
        root = str(tmp_path / "tree")
    for key, data in TREE.items():
        write(f"{root}/run/{key}", data)
    write(f"{root}/neighbour/kept.txt", b"kept")
    assert file_names_under(f"{root}/run") == sorted(TREE)
    assert file_names_under(f"{root}/run/") == sorted(TREE)
    assert file_names_under(f"{root}/nothing") is None
    assert path_exists(f"{root}/run") and path_exists(f"{root}/run/{next(iter(TREE))}")
    assert not path_exists(f"{root}/nothing")
    delete_folder(f"{root}/run")
    assert file_names_under(f"{root}/run") is None
    assert not path_exists(f"{root}/run") and path_exists(f"{root}/neighbour")
    assert file_names_under(f"{root}/neighbour") == ["kept.txt"]


def test_local_errors(tmp_path: Path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text")
    cases = [
        (
            lambda: read_bytes(str(tmp_path / "nothing.png")),
            f"{tmp_path}/nothing.png: no such file or folder",
        ),
        (
            lambda: list_files(str(tmp_path / "nothing"), IMAGES),
            f"{tmp_path}/nothing: no such file or folder",
        ),
        (
            lambda: list_files(str(tmp_path / "texts"), IMAGES),
            f"{tmp_path}/texts: no .png, .jpg or .jpeg files",
        ),
        (
            lambda: list_files(str(tmp_path / "texts" / "a.txt"), IMAGES),
            f"{tmp_path}/texts/a.txt: not a .png, .jpg or .jpeg file",
        ),
        (lambda: read_bytes(str(tmp_path / "texts")), f"{tmp_path}/texts: is a folder, not a file"),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as raised:
            call()
        assert error_line(raised) == message


def test_bounded_waits_reach_the_rebuilt_s3_filesystem(monkeypatch):
    """pyarrow takes timeouts only in the constructor: storage rebuilds the filesystem from the
    options pyarrow pickles itself with. This fails loudly if that layout changes (storage then
    falls back to pyarrow's own waits)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    filesystem, inner = storage.filesystem_for("s3://bucket/some/key")
    assert inner == "bucket/some/key"
    options = filesystem.__reduce__()[1][0]
    assert options["connect_timeout"] == storage.CONNECT_TIMEOUT_S
    assert options["request_timeout"] == storage.REQUEST_TIMEOUT_S
    assert options["endpoint_override"] == "127.0.0.1:9" and options["scheme"] == "http"
