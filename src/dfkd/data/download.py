"""``dfkd data get``: the official files of cifar10, cifar100, svhn, mnist and fashion-mnist, downloaded and verified.

Each file is fetched into ``<file>.part`` (an interrupted transfer is resumed with an HTTP Range request), checked
against its published checksum and only then renamed to its final name, in the layout the readers of
:mod:`dfkd.data.datasets` search: ``ROOT/cifar-10-python.tar.gz``, ``ROOT/cifar-100-python.tar.gz``,
``ROOT/svhn/*_32x32.mat``, ``ROOT/mnist/*.gz``, ``ROOT/fashion-mnist/*.gz``. Files already present and verified in
any searched root (e.g. Debian's ``/usr/share/datasets/fashion-mnist``) are used where they are.

Where the URLs and checksums come from (all MD5, as published):
- CIFAR-10/100: https://www.cs.toronto.edu/~kriz/cifar.html (the page lists each archive's md5sum); the same in
  pytorch/vision@5c2bb42d9594c4d1a2c892fca7279538626b2aad:torchvision/datasets/cifar.py.
- SVHN: the files of http://ufldl.stanford.edu/housenumbers/; the page publishes no checksum, these are torchvision's,
  pytorch/vision@212ff5169af7b4473b2be94370f865f97efcfc9b:torchvision/datasets/svhn.py.
- MNIST: yann.lecun.com/exdb/mnist no longer serves the files; the mirror and MD5s are torchvision's,
  pytorch/vision@1ec2509e8715d5373b194b688ee0cc75262baec9:torchvision/datasets/mnist.py.
- Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (README table of files and MD5s); the same in
  torchvision's mnist.py above.
- Sizes (SVHN, MNIST, Fashion-MNIST): tensorflow/datasets@333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5:
  tensorflow_datasets/url_checksums/ (svhn_cropped.txt, fashion_mnist.txt; mnist.txt at
  31f1255e57e519a6c004f0b097a2f5cfcf0dde7d).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dfkd.data.datasets import DATASETS, candidate_roots, default_root, load_dataset
from dfkd.errors import ConfigError, DataError, DownloadError, closest

log = logging.getLogger(__name__)

MIRROR_ENV_VAR = "DFKD_DATA_MIRROR"
TIMEOUT_S = 60  # per connection attempt and per stalled read; a stall keeps the .part for the next run
_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """One published file of a dataset.

    Attributes:
        name: the file name, as published and on disk.
        url: where it is published.
        digest: its published checksum, lowercase hex.
        algorithm: the :mod:`hashlib` name of the checksum.
        size: its size in bytes, when known (a file of another size is not it, without hashing it).
        folder: the sub-folder of a data root the readers search for it ("" for the root itself).
        content_digest: for a ``.gz``, the checksum of the decompressed bytes: a copy recompressed by a packager
            (Debian's drops the file name from the gzip header) holds the same data but not the same bytes.
    """

    name: str
    url: str
    digest: str
    algorithm: str = "md5"
    size: int | None = None
    folder: str = ""
    content_digest: str | None = None

    @property
    def relpath(self) -> str:
        """The path below a data root, e.g. ``fashion-mnist/train-images-idx3-ubyte.gz``."""
        return f"{self.folder}/{self.name}" if self.folder else self.name


_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz")


def _idx(folder: str, base_url: str, sums: Sequence[tuple[str, int, str | None]]) -> tuple[RemoteFile, ...]:
    """The four IDX files of an MNIST-like set; ``sums``: (digest, size, content digest) in :data:`_IDX_NAMES` order."""
    return tuple(
        RemoteFile(name, base_url + name, md5, size=size, folder=folder, content_digest=content)
        for name, (md5, size, content) in zip(_IDX_NAMES, sums, strict=True)
    )


REMOTE: dict[str, tuple[RemoteFile, ...]] = {
    "cifar10": (
        RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   "c58f30108f718f92721af3b95e74349a"),
    ),
    "cifar100": (
        RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "eb9058c3a382ffc7106e4002c42a8d85"),
    ),
    "svhn": (
        RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                   "e26dedcc434d2e4c54c9b2d4a06d8373", size=182040794, folder="svhn"),
        RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                   "eb5a983be6a315427106f1b164d9cef3", size=64275384, folder="svhn"),
    ),
    "mnist": _idx("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/", (
        ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422, None),
        ("d53e105ee54ea40749a09fcbcd1e9432", 28881, None),
        ("9fb629c4189551a2d022fa330f9573f3", 1648877, None),
        ("ec29112dd5afa0611ce80d1b7f02629c", 4542, None),
    )),
    # The content digests are the MD5s of the decompressed IDX files. Debian's dataset-fashion-mnist
    # (0.0~git20200523.55506a9-1) ships gzips without the file name in the header, 24 bytes shorter than the
    # published ones and so with other MD5s; decompressed, its four files give exactly these sums.
    "fashion-mnist": _idx("fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", (
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        ("25c81989df183df01b3e8a0aad5dffbe", 29515, "9018921c3c673c538a1fc5bad174d6f9"),
        ("bef4ecab320f06d8554ea6380940ec79", 4422102, "8181f5470baa50b63fa0f6fddb340f0a"),
        ("bb300cfdad3c16e7a12a480ee83cd310", 5148, "15d484375f8d13e6eb1aabb0c3f46965"),
    )),
}  # fmt: skip


def downloadable(name: str) -> str:
    """The name ``dfkd data get`` fetches for ``name``: itself, or the dataset a derived one is made from
    (``fashion-mnist-32x3`` -> ``fashion-mnist``).

    Raises:
        ConfigError: an unknown name (with the closest one), or a dataset that has nothing to download.
    """
    if name not in DATASETS:
        choices = [*REMOTE, *DATASETS.names()]
        raise ConfigError(
            f"unknown dataset '{name}'{closest(name, choices)}; `dfkd data get` fetches {', '.join(REMOTE)}"
        )
    base = name
    while DATASETS.get(base).base is not None:
        base = DATASETS.get(base).base  # type: ignore[assignment]
    if base not in REMOTE:
        raise ConfigError(
            f"'{name}' has no files to download ({DATASETS.get(name).info.description}); "
            f"`dfkd data get` fetches {', '.join(REMOTE)}"
        )
    return base


def file_digest(path: Path, algorithm: str, *, decompress: bool = False) -> str:
    """The hex checksum of a file's bytes, or of its gunzipped bytes with ``decompress``."""
    h = hashlib.new(algorithm)
    with (gzip.open if decompress else open)(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, remote: RemoteFile) -> bool:
    """Whether ``path`` is the published file: same checksum, or (a recompressed ``.gz``) same decompressed bytes."""
    try:
        if (remote.size is None or path.stat().st_size == remote.size) and (
            file_digest(path, remote.algorithm) == remote.digest
        ):
            return True
        if remote.content_digest is not None:
            return file_digest(path, remote.algorithm, decompress=True) == remote.content_digest
    except (OSError, EOFError, zlib.error):
        return False
    return False


@dataclass(frozen=True)
class FileStatus:
    """One file of a dataset: the first searched root holding a copy (None: missing) and whether that copy verifies."""

    remote: RemoteFile
    root: Path | None
    verified: bool

    @property
    def path(self) -> Path | None:
        return None if self.root is None else self.root / self.remote.relpath


def dataset_status(name: str, root: str | os.PathLike | None = None) -> list[FileStatus]:
    """Each published file of ``name``: its first copy in :func:`candidate_roots` and whether it verifies."""
    statuses = []
    for remote in REMOTE[downloadable(name)]:
        where = next((r for r in candidate_roots(root) if (r / remote.relpath).is_file()), None)
        statuses.append(FileStatus(remote, where, where is not None and verify(where / remote.relpath, remote)))
    return statuses


def get_dataset(
    name: str, root: str | os.PathLike | None = None, *, mirror: str | None = None, progress: bool = True
) -> Path:
    """Make sure the published files of a dataset are on disk and verified, downloading what is missing.

    Args:
        name: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (or a dataset derived from one).
        root: the data root to download into (default :func:`default_root`); the first root the loaders search
            when given as ``data.root``.
        mirror: a base URL (``http(s)://`` or ``file://``) laid out like a data root, e.g. ``MIRROR/mnist/...``,
            used instead of the publishers' URLs (default ``$DFKD_DATA_MIRROR``); the checksums stay the published
            ones.
        progress: a progress bar per download (on a terminal only).

    Returns:
        The data root that holds the verified files: the one to pass as ``data.root`` (``/usr/share/datasets`` when
        Debian's Fashion-MNIST is used in place).

    Raises:
        ConfigError: unknown dataset, or a mirror that is not a URL.
        DownloadError: a server that cannot be reached, a corrupt or cut-short transfer, files that verify but do
            not load; one line that says what to do (a cut-short transfer is resumed by calling again).
    """
    base = downloadable(name)
    remotes = REMOTE[base]
    mirror = mirror or os.environ.get(MIRROR_ENV_VAR) or None
    if mirror is not None and urllib.parse.urlparse(mirror).scheme not in ("http", "https", "file"):
        raise ConfigError(f"the mirror must be an http(s):// or file:// URL, got '{mirror}'")
    target = Path(root).expanduser() if root not in (None, "") else default_root()
    where = _verified_root(remotes, target, candidate_roots(target))
    if where is None:
        for remote in remotes:
            dest = target / remote.relpath
            if dest.is_file() and verify(dest, remote):
                log.info("%s: verified", dest)
                continue
            url = remote.url if mirror is None else f"{mirror.rstrip('/')}/{remote.relpath}"
            _fetch(remote, url, dest, base, progress)
        where = target
    try:
        load_dataset(base, "test", where)
    except DataError as e:
        raise DownloadError(f"{base}: the files in {where} match their checksums but do not load: {e}") from e
    return where


def _verified_root(remotes: Sequence[RemoteFile], target: Path, roots: Sequence[Path]) -> Path | None:
    """The root that already holds every file verified: the target, or a later root when the target holds none of
    them (a partial or bad copy in the target would be read before it, so then the target is completed instead)."""
    if all(verify(target / r.relpath, r) for r in remotes):
        for r in remotes:
            log.info("%s: verified", target / r.relpath)
        return target
    if any((target / r.relpath).exists() for r in remotes):
        return None
    for root in roots:
        if root != target and all(verify(root / r.relpath, r) for r in remotes):
            for r in remotes:
                log.info("%s: verified (used where it is)", root / r.relpath)
            return root
    return None


def _fetch(remote: RemoteFile, url: str, dest: Path, name: str, progress: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest.parent} ({e.strerror}): choose another --root") from e
    if part.is_file() and remote.size is not None and part.stat().st_size >= remote.size:
        # An earlier run received everything but stopped before renaming: check it before asking for more.
        if verify(part, remote):
            os.replace(part, dest)
            log.info("%s: verified (completed by an earlier run)", dest)
            return
        part.unlink()
    _transfer(url, part, dest, remote, name, progress)
    if not verify(part, remote):
        got = file_digest(part, remote.algorithm)
        part.unlink()
        raise DownloadError(
            f"{url} arrived corrupt ({remote.algorithm} {got}, published {remote.digest}); the file was deleted: "
            f"run `dfkd data get {name}` again to retry"
        )
    os.replace(part, dest)
    log.info("%s: downloaded and verified", dest)


def _transfer(url: str, part: Path, dest: Path, remote: RemoteFile, name: str, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (all of it when the server ignores the Range request)."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dfkd"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # nothing past what the .part holds: it is the whole file, or verify rejects it
            return
        raise _unreachable(url, dest, name, f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _unreachable(url, dest, name, getattr(reason, "strerror", None) or str(reason)) from e
    with response:
        resumed = have > 0 and getattr(response, "status", None) == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            part.unlink()
            raise DownloadError(
                f"{url} answered the resume from byte {have} with other bytes; the partial file was deleted: "
                f"run `dfkd data get {name}` again to download it whole"
            )
        if not resumed:
            have = 0  # the server sends the whole file: start the .part again
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else remote.size
        bar = tqdm(total=expected, initial=have, desc=remote.name, unit="B", unit_scale=True, unit_divisor=1024,
                   dynamic_ncols=True, disable=None if progress else True, leave=False, mininterval=0.5)
        try:
            with open(part, "ab" if resumed else "wb") as out, bar:
                received, failure = _copy(response, out, bar)
        except OSError as e:
            raise DownloadError(f"cannot write {part} ({e.strerror}): free some space or choose another --root") from e
    if failure is not None or (expected is not None and have + received < expected):
        total = f"{expected:,}" if expected is not None else "?"
        raise DownloadError(
            f"the download of {url} stopped after {have + received:,} of {total} bytes "
            f"({failure or 'connection closed'}); {part} is kept: run `dfkd data get {name}` again to resume it"
        )


def _copy(response, out, bar: tqdm) -> tuple[int, str | None]:
    """Stream the body into ``out``: (bytes received, the reason it stopped early or None)."""
    received = 0
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (http.client.HTTPException, OSError) as e:  # reset, timeout, IncompleteRead: a network failure
            return received, str(e) or type(e).__name__
        if not chunk:
            return received, None
        out.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _unreachable(url: str, dest: Path, name: str, reason: str) -> DownloadError:
    return DownloadError(
        f"cannot download {url} ({reason}); get it another way and put it at {dest}, "
        f"then run `dfkd data get {name}` to verify it"
    )
