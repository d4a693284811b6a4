"""`dfkd data get` against a loopback HTTP server serving tiny files in the real formats: good, already present,
corrupted, truncated, interrupted, a server that ignores Range, offline. No test touches the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from helpers import assert_one_line_error, make_archive, make_fashion_like, run_cli, write_cifar10, write_cifar100

from dfkd.data import clear_cache, get_dataset, load_dataset
from dfkd.data import datasets as ds
from dfkd.data import download as dl
from dfkd.errors import DownloadError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


class Server:
    """What the loopback server serves (by path below a data root, under any first URL segment) and what it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()  # the next answer for these sends half its body, then closes
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (URL path, Range header)
        self.url = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                relpath = self.path.lstrip("/").partition("/")[2]
                body = server.files.get(relpath)
                if body is None:
                    self.send_error(404)
                    return
                start, wanted = 0, self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if relpath in server.truncate:
                    server.truncate.discard(relpath)
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)  # HTTP/1.0: the connection closes after the answer, cut short or not

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Tiny stand-ins for the published files of every dataset, by name and path below a data root."""
    work = tmp_path_factory.mktemp("published")
    write_cifar10(work / "c10" / "cifar-10-batches-py")
    make_archive(work / "c10" / "cifar-10-batches-py", work / "cifar-10-python.tar.gz")
    write_cifar100(work / "c100" / "cifar-100-python")
    make_archive(work / "c100" / "cifar-100-python", work / "cifar-100-python.tar.gz")
    svhn = {}
    rng = np.random.default_rng(3)
    for split, n in (("train", 6), ("test", 5)):
        buffer = io.BytesIO()
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for the digit 0
        scipy.io.savemat(buffer, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
        svhn[f"svhn/{split}_32x32.mat"] = buffer.getvalue()
    idx = make_fashion_like(work / "idx", n_train=20, n_test=10) / "fashion-mnist"
    files = {
        "cifar10": {"cifar-10-python.tar.gz": (work / "cifar-10-python.tar.gz").read_bytes()},
        "cifar100": {"cifar-100-python.tar.gz": (work / "cifar-100-python.tar.gz").read_bytes()},
        "svhn": svhn,
    }
    for name in ("mnist", "fashion-mnist"):
        files[name] = {f"{name}/{p.name}": p.read_bytes() for p in sorted(idx.iterdir())}
    return files


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def server(monkeypatch, published, tmp_path):
    """The loopback server, with REMOTE pointed at it (URL, checksum and size of the tiny files) and no real root
    searched (no Debian folder, an empty per-user folder)."""
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}"
    for name, remotes in dl.REMOTE.items():
        tiny = []
        for remote in remotes:
            data = published[name][remote.relpath]
            state.files[remote.relpath] = data
            url = f"{state.url}/official/{remote.relpath}"
            tiny.append(dataclasses.replace(remote, url=url, digest=md5(data), size=len(data), content_digest=None))
        monkeypatch.setitem(dl.REMOTE, name, tuple(tiny))
    monkeypatch.setattr(ds, "DEBIAN_ROOT", str(tmp_path / "debian"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    clear_cache()
    yield state
    httpd.shutdown()
    httpd.server_close()
    clear_cache()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(err: DownloadError | str) -> str:
    text = str(err)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"])
def test_good_download_lands_verified_and_loads(server, published, tmp_path, name):
    root = tmp_path / "data"
    assert get_dataset(name, root, progress=False) == root
    for relpath, data in published[name].items():
        assert (root / relpath).read_bytes() == data
        assert not (root / (relpath + ".part")).exists()
    assert sorted(server.requests) == sorted((f"/official/{p}", None) for p in published[name])
    images, labels = load_dataset(name, "test", root)
    assert len(images) == len(labels) > 0 and images.shape[1:] == ds.dataset_info(name).image_shape


def test_already_present_makes_no_request(server, tmp_path):
    root = tmp_path / "data"
    get_dataset("mnist", root, progress=False)
    server.requests.clear()
    assert get_dataset("mnist", root, progress=False) == root
    assert server.requests == []


def test_verified_copy_elsewhere_is_used_in_place(server, tmp_path):
    debian = tmp_path / "debian"  # the monkeypatched Debian location, searched after the target
    get_dataset("fashion-mnist", debian, progress=False)
    server.requests.clear()
    target = tmp_path / "empty"
    assert get_dataset("fashion-mnist", target, progress=False) == debian
    assert server.requests == [] and not target.exists()
    # A derived name fetches (here: finds) its base dataset.
    assert get_dataset("fashion-mnist-32x3", None, progress=False) == debian


def test_bad_copy_in_the_target_is_replaced_not_shadowing_a_good_one(server, published, tmp_path):
    get_dataset("mnist", tmp_path / "debian", progress=False)
    target = tmp_path / "data"
    (target / "mnist").mkdir(parents=True)
    (target / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"not the file")
    server.requests.clear()
    assert get_dataset("mnist", target, progress=False) == target
    for relpath, data in published["mnist"].items():
        assert (target / relpath).read_bytes() == data
    assert len(server.requests) == 4


def test_corrupted_download_is_deleted(server, published, tmp_path):
    relpath = "cifar-10-python.tar.gz"
    server.files[relpath] = b"X" + published["cifar10"][relpath][1:]
    with pytest.raises(DownloadError) as err:
        get_dataset("cifar10", tmp_path / "data", progress=False)
    msg = one_line(err.value)
    assert "arrived corrupt" in msg and "run `dfkd data get cifar10` again" in msg and f"/official/{relpath}" in msg
    assert not (tmp_path / "data" / relpath).exists()
    assert not (tmp_path / "data" / (relpath + ".part")).exists()


def test_truncated_download_keeps_the_part_and_resumes(server, published, tmp_path):
    relpath, root = "svhn/test_32x32.mat", tmp_path / "data"
    data = published["svhn"][relpath]
    server.truncate.add(relpath)
    with pytest.raises(DownloadError) as err:
        get_dataset("svhn", root, progress=False)
    msg = one_line(err.value)
    half = len(data) // 2
    assert f"stopped after {half:,} of {len(data):,} bytes" in msg and "again to resume" in msg
    part = root / (relpath + ".part")
    assert part.read_bytes() == data[:half] and not (root / relpath).exists()
    assert get_dataset("svhn", root, progress=False) == root
    assert server.requests[-1] == (f"/official/{relpath}", f"bytes={half}-")
    assert (root / relpath).read_bytes() == data and not part.exists()


def test_interrupted_download_is_resumed_with_range(server, published, tmp_path):
    relpath, root = "cifar-100-python.tar.gz", tmp_path / "data"
    data = published["cifar100"][relpath]
    root.mkdir()
    (root / (relpath + ".part")).write_bytes(data[:1000])
    get_dataset("cifar100", root, progress=True)  # the bar is off: not a terminal
    assert server.requests == [(f"/official/{relpath}", "bytes=1000-")]
    assert (root / relpath).read_bytes() == data


def test_server_that_ignores_range_gives_a_fresh_download(server, published, tmp_path):
    relpath, root = "mnist/t10k-labels-idx1-ubyte.gz", tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    (root / (relpath + ".part")).write_bytes(b"stale bytes of another try")
    server.ignore_range = True
    get_dataset("mnist", root, progress=False)
    assert (f"/official/{relpath}", "bytes=26-") in server.requests
    assert (root / relpath).read_bytes() == published["mnist"][relpath]


def test_complete_part_is_finished_without_downloading_again(server, published, monkeypatch, tmp_path):
    relpath, root = "cifar-10-python.tar.gz", tmp_path / "data"
    data = published["cifar10"][relpath]
    root.mkdir()
    (root / (relpath + ".part")).write_bytes(data)
    # With no size known, the Range request past the end gets 416: the .part is verified as it is.
    monkeypatch.setitem(dl.REMOTE, "cifar10", (dataclasses.replace(dl.REMOTE["cifar10"][0], size=None),))
    get_dataset("cifar10", root, progress=False)
    assert server.requests == [(f"/official/{relpath}", f"bytes={len(data)}-")]
    assert (root / relpath).read_bytes() == data


def test_offline_names_the_url_and_where_to_put_the_file(server, tmp_path):
    mirror = f"http://127.0.0.1:{closed_port()}/mirror"
    with pytest.raises(DownloadError) as err:
        get_dataset("mnist", tmp_path / "data", mirror=mirror, progress=False)
    msg = one_line(err.value)
    first = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    assert f"cannot download {mirror}/mnist/train-images-idx3-ubyte.gz" in msg and f"put it at {first}" in msg
    assert not first.with_name(first.name + ".part").exists()
    server.files.pop("mnist/t10k-images-idx3-ubyte.gz")
    with pytest.raises(DownloadError, match="HTTP 404"):
        get_dataset("mnist", tmp_path / "data", progress=False)


def test_mirror_replaces_the_publisher(server, published, monkeypatch, tmp_path):
    get_dataset("svhn", tmp_path / "a", mirror=f"{server.url}/mirror/", progress=False)
    assert sorted(server.requests) == sorted((f"/mirror/{p}", None) for p in published["svhn"])
    server.requests.clear()
    monkeypatch.setenv(dl.MIRROR_ENV_VAR, f"{server.url}/env-mirror")
    get_dataset("svhn", tmp_path / "b", progress=False)
    assert {path.split("/")[1] for path, _ in server.requests} == {"env-mirror"}


def test_file_url_mirror(server, published, tmp_path):
    folder = tmp_path / "shared"
    for relpath, data in published["mnist"].items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(data)
    assert get_dataset("mnist", tmp_path / "data", mirror=folder.as_uri(), progress=False) == tmp_path / "data"
    assert server.requests == []
    for relpath, data in published["mnist"].items():
        assert (tmp_path / "data" / relpath).read_bytes() == data


def test_file_that_verifies_but_does_not_load(server, monkeypatch, tmp_path):
    junk = b"a tar.gz in name only"
    server.files["cifar-10-python.tar.gz"] = junk
    remote = dataclasses.replace(dl.REMOTE["cifar10"][0], digest=md5(junk), size=len(junk))
    monkeypatch.setitem(dl.REMOTE, "cifar10", (remote,))
    with pytest.raises(DownloadError) as err:
        get_dataset("cifar10", tmp_path / "data", progress=False)
    msg = one_line(err.value)
    assert "match their checksums but do not load" in msg and "cannot read the archive" in msg


def test_recompressed_gzip_verifies_by_its_content(tmp_path):
    raw = b"\x00\x00\x08\x01\x00\x00\x00\x03abc"
    published, repacked = gzip.compress(raw, mtime=1), gzip.compress(raw, mtime=2, compresslevel=1)
    remote = dl.RemoteFile("x.gz", "http://127.0.0.1/x.gz", md5(published), size=len(published))
    path = tmp_path / "x.gz"
    path.write_bytes(repacked)
    assert not dl.verify(path, remote)
    assert dl.verify(path, dataclasses.replace(remote, content_digest=md5(raw)))
    path.write_bytes(gzip.compress(raw + b"!"))
    assert not dl.verify(path, dataclasses.replace(remote, content_digest=md5(raw)))


def test_default_root_is_found_without_flags(server, capsys, tmp_path):
    code, out, err = run_cli(capsys, "data", "get", "mnist")
    assert code == 0, err
    user = tmp_path / "xdg" / "dfkd" / "datasets"
    assert f"the files are in {user}, verified; dfkd finds them there without flags" in out
    assert (user / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    clear_cache()
    assert len(load_dataset("mnist-32", "test")[1]) == 10


def test_cli(server, published, capsys, tmp_path):
    root = tmp_path / "data"
    code, out, err = run_cli(capsys, "data", "get", "svhn", "--root", root, "--mirror", f"{server.url}/m")
    assert code == 0, err
    assert f"the files are in {root}, verified; pass data.root={root} or set DFKD_DATA={root}" in out
    (root / "cifar-10-python.tar.gz").write_bytes(b"junk")
    code, out, _ = run_cli(capsys, "data", "list", "--root", root)
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and f"verified in {root}" in lines["svhn"]
    assert f"{root / 'cifar-10-python.tar.gz'} does not match its checksum" in lines["cifar10"]
    assert "4 of 4 files missing (`dfkd data get mnist`)" in lines["mnist"]

    server.files["cifar-100-python.tar.gz"] = b"corrupt"
    code, out, err = run_cli(capsys, "data", "get", "cifar100", "--root", root)
    errors = [line for line in err.splitlines() if line.startswith("dfkd: failed:")]
    assert code == 1 and len(errors) == 1 and "arrived corrupt" in errors[0] and "Traceback" not in err

    assert_one_line_error(*run_cli(capsys, "data", "get", "cifar-10")[::2], "did you mean 'cifar10'")
    assert_one_line_error(*run_cli(capsys, "data", "get", "digits-32")[::2], "no files to download")
    assert_one_line_error(*run_cli(capsys, "data", "get", "mnist", "--mirror", "mirror")[::2], "http(s):// or file://")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "data")
    assert exit_info.value.code == 2 and "required: ACTION" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_verified_in_place(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(dl.MIRROR_ENV_VAR, f"http://127.0.0.1:{closed_port()}")  # any download would fail
    code, out, err = run_cli(capsys, "data", "get", "fashion-mnist")
    assert code == 0, err
    assert "the files are in /usr/share/datasets, verified" in out
    assert not (tmp_path / "xdg").exists()
