"""Files from the network, checked before use: models by URL and torchvision's weights.

Both follow torch.hub's convention: a file's name carries the first hex digits of its
SHA-256 before the extension (`unet-1a2b3c4d.pt`, `resnet50-0676ba61.pth`), and a file,
downloaded or already in the cache, is used only when it hashes to them. Nothing here
imports the lab's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pickle
import posixpath
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from seglab import filesystem


class DownloadError(Exception):
    """A file that cannot be downloaded, or one that is not what its name says; the message
    says what to do."""


# At least this many hex digits of the SHA-256 in the file name: 8 digits leave a damaged or
# wrong file one chance in four billion to pass, fewer would make the check a formality.
MIN_HASH_DIGITS = 8
DOWNLOAD_CHUNK = 1 << 20
# Seconds a connection may stay silent before the download is given up, so that a stalled
# server ends in a message instead of a process that waits forever.
DOWNLOAD_TIMEOUT = 60
# A server that sends a byte now and then never trips that timeout: the whole download must
# also end by DOWNLOAD_TIMEOUT seconds plus its size at this rate (bytes a second), 8 minutes
# for a 500 MB checkpoint.
MIN_DOWNLOAD_RATE = 1_000_000
# A temporary file of a download that nothing has written to for this long was left by a
# process that died (kill -9, a power cut): a live download writes or gives up within
# DOWNLOAD_TIMEOUT.
STALE_PARTIAL_SECONDS = 3600
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def local_model_file(model: str, progress: bool = True) -> Path:
    """`model` itself when it is a local path; for an http(s) URL, the file downloaded once
    into torch.hub's cache ($TORCH_HOME/hub/checkpoints, i.e. Path(torch.hub.get_dir()) /
    "checkpoints") under the file name of the URL.

    As in torch.hub, that name carries the first hex digits of the file's SHA-256 before its
    extension (`NAME-<hex>.pt`, at least 8 digits): the download, and a cached copy each time
    it is used again, must hash to that prefix. A download is written to a temporary file in
    the cache folder and renamed into place only when it is whole and matches, so a refused
    download leaves nothing behind. `progress` shows a bar on stderr while downloading.

    Raises DownloadError for a URL whose name has no hash prefix, for a failed, cut short
    or mismatching download, and for a cached file that no longer matches its name.
    """
    scheme = SCHEME.match(model)
    if scheme is None:
        return Path(model)  # load_checkpoint says so when it does not exist
    if scheme.group(1).lower() not in ("http", "https"):
        raise DownloadError(f"cannot download {model}: only http:// and https:// URLs work")
    name, prefix = hashed_file_name(model)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.exists():
        check_hash_prefix(cached, prefix)
    else:
        download_checked(model, cached, prefix, progress)
    return cached


def hashed_file_name(url: str) -> tuple[str, str]:
    """The file name of `url` and the SHA-256 prefix it carries (torch.hub.HASH_REGEX, the
    same rule torch.hub.load_state_dict_from_url applies to the same name)."""
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    match = torch.hub.HASH_REGEX.search(name)
    digits = match.group(1) if match else ""
    if MIN_HASH_DIGITS <= len(digits) <= 64:
        return name, digits
    found = f" (it has {len(digits)})" if digits else ""
    raise DownloadError(
        f"cannot download {url}: its file name {name!r} must end in "
        f"-<first {MIN_HASH_DIGITS} or more hex digits of its SHA-256> before the extension"
        f"{found}, e.g. unet-1a2b3c4d.pt; compute the hash with `sha256sum FILE` and rename "
        "the file before publishing it"
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(DOWNLOAD_CHUNK):
            sha256.update(chunk)
    return sha256.hexdigest()


def check_hash_prefix(path: Path, prefix: str) -> None:
    """Trust a file of torch.hub's cache only while it hashes to the prefix its name carries:
    a copy damaged on disk, or replaced by anyone with access to the folder, would otherwise
    load as if it were the file published under that name. It is not replaced here: it may
    be the only copy on a machine offline."""
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise DownloadError(f"cannot read {path}: {error.strerror or error}") from None
    if not digest.startswith(prefix):
        raise DownloadError(
            f"refused to load {path}: its SHA-256 {digest} does not start with {prefix}, the "
            "hash in its name, so it is not the file published under that name; delete it "
            "to download it again"
        )


def download_checked(url: str, destination: Path, prefix: str, progress: bool) -> None:
    """Download `url` to `destination` when the bytes arrive whole and hash to `prefix`;
    otherwise raise DownloadError and leave nothing in the folder."""
    folder = destination.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"cannot create the model cache {folder}: {error}") from None
    # A name of its own per call, so that two processes fetching the same URL (torchrun)
    # never write into each other's file; the last rename wins with the same bytes.
    remove_stale_partials(folder)
    temporary = folder / f".{destination.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    failed = f"cannot download {url} (expected SHA-256 prefix {prefix})"
    untouched = f"nothing was written to {folder}"
    try:
        digest, received, length = stream_to_file(url, temporary, destination.name, progress)
        if length is not None and received != length:
            raise DownloadError(
                f"{failed}: the connection closed after {received} of {length} bytes; {untouched}"
            )
        if not digest.startswith(prefix):
            raise DownloadError(
                f"{failed}: the downloaded file's SHA-256 is {digest}, which does not start "
                f"with {prefix}; {untouched}"
            )
        os.replace(temporary, destination)
    # HTTPError is a URLError is an OSError: the most precise message first.
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{failed}: HTTP {error.code} {error.reason}; {untouched}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"{failed}: {error.reason}; {untouched}") from None
    except (http.client.HTTPException, OSError, ValueError) as error:
        # IncompleteRead of a chunked reply, a reset or timed out connection, a full disk,
        # a malformed URL
        detail = str(error) or type(error).__name__
        raise DownloadError(f"{failed}: {detail}; {untouched}") from None
    finally:
        temporary.unlink(missing_ok=True)  # also on Ctrl-C
    filesystem.sync_folder(folder)  # the file is in place; only durability is at stake


def remove_stale_partials(folder: Path) -> None:
    """Delete the temporary files of downloads that died in `folder` (see
    STALE_PARTIAL_SECONDS); they would otherwise stay in the cache forever."""
    now = time.time()
    for partial in folder.glob(".*.partial"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if now - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                partial.unlink()


def stream_to_file(url: str, path: Path, label: str, progress: bool) -> tuple[str, int, int | None]:
    """Write the body of `url` to the new file `path`, flushed to disk, with a progress bar
    named `label`; return its SHA-256, the bytes received and the Content-Length announced
    (None without one).

    torch.hub.download_url_to_file is not used: http.client returns a body that the server
    cut short as if it were complete, and only the hash check would then notice, with a
    misleading message; here the byte count is compared with Content-Length."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "segmentation-lab"})
    sha256 = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
        announced = response.headers.get("Content-Length", "")
        length = int(announced) if announced.strip().isdigit() else None
        # Permissions as for any new file (umask), not mkstemp's 0600: the cache may be shared.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with (
            open(descriptor, "wb") as file,
            tqdm(
                total=length,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            start = time.monotonic()
            # read1: what has arrived, up to a chunk, so that the time is checked while bytes
            # trickle in (read waits for a whole chunk).
            while chunk := response.read1(DOWNLOAD_CHUNK):
                allowed = DOWNLOAD_TIMEOUT + max(length or 0, received) / MIN_DOWNLOAD_RATE
                if time.monotonic() - start > allowed:
                    raise TimeoutError(
                        f"too slow: {received} bytes in {allowed:.0f} s, below "
                        f"{MIN_DOWNLOAD_RATE / 1e6:g} MB/s"
                    )
                file.write(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            file.flush()
            os.fsync(file.fileno())
    return sha256.hexdigest(), received, length


def published_state(weights) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's `weights`, downloaded once into torch's cache and read
    with weights_only=True: torchvision's own loader would unpickle any object the file holds.

    The file name carries the first hex digits of its SHA-256 (`resnet50-0676ba61.pth`).
    torch.hub checks them on download only; a file already in the cache, which anyone with
    access to the folder may have replaced, is checked here before it is read."""
    name = Path(urllib.parse.urlsplit(weights.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    match = torch.hub.HASH_REGEX.search(name)
    if match is None:
        raise DownloadError(f"{weights.url} carries no hash in its name to check it against")
    if cached.exists():
        check_hash_prefix(cached, match.group(1))
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise DownloadError(
            f"cannot load {weights.url} ({str(error).splitlines()[0]}); without a network, "
            f"copy that file to {cached}"
        ) from None
    except pickle.UnpicklingError:  # its hash matched, so the published file itself
        raise DownloadError(
            f"refused to load {cached}: it holds Python objects that could run code; "
            "delete it to download it again"
        ) from None
