"""Models by URL: downloads.local_model_file against a real HTTP server on 127.0.0.1.

The server serves a small checkpoint under its correct hash-prefixed name, the same bytes
under a wrong prefix, a reply cut short before its Content-Length, and 404 for the rest.
TORCH_HOME points into tmp_path, so torch.hub's cache is the test's own.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from seglab import downloads


def checkpoint_bytes() -> bytes:
    """A real, small torch.save file, as a teacher would publish one."""
    buffer = io.BytesIO()
    torch.save({"x": torch.arange(10)}, buffer)
    return buffer.getvalue()


PAYLOAD = checkpoint_bytes()
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
GOOD_NAME = f"tiny-{DIGEST[:8]}.pt"
# The same bytes under a prefix that differs from the real one in its first digit.
WRONG_NAME = f"tiny-{'0' if DIGEST[0] != '0' else '1'}{DIGEST[1:8]}.pt"


@dataclass
class Server:
    """The base URL of the running server and the paths it was asked for, in order."""

    url: str
    requests: list[str] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    """GET /NAME serves PAYLOAD for the good and the wrong name; /cut/NAME announces all of
    PAYLOAD but sends half and closes; anything else is 404."""

    server_state: Server  # set on a subclass per server

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.server_state.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name not in (GOOD_NAME, WRONG_NAME):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        cut = self.path.startswith("/cut/")
        self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2] if cut else PAYLOAD)
        self.close_connection = True  # HTTP/1.0 anyway: the socket closes after this reply

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output quiet."""


@pytest.fixture(scope="module")
def running_server() -> Iterator[Server]:
    """One server for the module: starting and stopping one per test costs time."""
    state = Server(url="")
    handler = type("BoundHandler", (Handler,), {"server_state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # A short poll interval so that shutdown() returns at once.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def server(running_server: Server) -> Server:
    """The module's server with its request log emptied for this test."""
    running_server.requests.clear()
    return running_server


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's checkpoint folder, under a TORCH_HOME of this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # get_dir follows $TORCH_HOME only while nobody called torch.hub.set_dir.
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub" / "checkpoints"


def files_in(folder: Path) -> list[str]:
    """Every entry of `folder`, hidden temporary files included ([] if it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_url_downloads_once_into_torch_hub_cache(server: Server, cache: Path) -> None:
    url = f"{server.url}/models/{GOOD_NAME}"
    path = downloads.local_model_file(url, progress=False)
    assert path == cache / GOOD_NAME
    assert path.read_bytes() == PAYLOAD
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(10))
    assert files_in(cache) == [GOOD_NAME]  # no temporary file left beside it
    assert downloads.local_model_file(url, progress=False) == path
    assert server.requests == [f"/models/{GOOD_NAME}"]  # the second call used the cache


def test_progress_bar_goes_to_stderr(
    server: Server, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    downloads.local_model_file(f"{server.url}/{GOOD_NAME}", progress=True)
    captured = capsys.readouterr()
    assert GOOD_NAME in captured.err and captured.out == ""


def test_wrong_hash_is_refused_and_leaves_nothing(server: Server, cache: Path) -> None:
    url = f"{server.url}/{WRONG_NAME}"
    with pytest.raises(downloads.DownloadError) as error:
        downloads.local_model_file(url, progress=False)
    message = str(error.value)
    assert url in message and WRONG_NAME[5:13] in message and DIGEST in message
    assert "nothing was written" in message
    assert files_in(cache) == []


def test_download_cut_short_is_refused_and_leaves_nothing(server: Server, cache: Path) -> None:
    url = f"{server.url}/cut/{GOOD_NAME}"
    with pytest.raises(downloads.DownloadError) as error:
        downloads.local_model_file(url, progress=False)
    message = str(error.value)
    assert url in message and DIGEST[:8] in message
    assert f"{len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes" in message
    assert files_in(cache) == []


def test_http_error_names_the_status(server: Server, cache: Path) -> None:
    url = f"{server.url}/missing-{DIGEST[:8]}.pt"
    with pytest.raises(downloads.DownloadError, match="HTTP 404") as error:
        downloads.local_model_file(url, progress=False)
    assert url in str(error.value)
    assert files_in(cache) == []


def test_connection_refused_is_a_checkpoint_error(cache: Path) -> None:
    # A port that was free a moment ago: nothing listens there, the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{GOOD_NAME}"
    with pytest.raises(downloads.DownloadError, match="cannot download") as error:
        downloads.local_model_file(url, progress=False)
    assert url in str(error.value)
    assert files_in(cache) == []


@pytest.mark.parametrize(
    "name", ["tiny.pt", "tiny-1a2b3c.pt", "tiny-1A2B3C4D.pt", "tiny-1a2b3c4d", ""]
)
def test_name_without_hash_prefix_is_refused_before_any_request(
    server: Server, cache: Path, name: str
) -> None:
    with pytest.raises(downloads.DownloadError, match="sha256sum FILE"):
        downloads.local_model_file(f"{server.url}/models/{name}", progress=False)
    assert server.requests == []
    assert files_in(cache) == []


def test_other_url_schemes_are_refused(cache: Path) -> None:
    with pytest.raises(downloads.DownloadError, match="only http:// and https://"):
        downloads.local_model_file(f"ftp://example.org/{GOOD_NAME}")


@pytest.mark.parametrize("model", ["runs/unet/best.pt", "/abs/tiny.pt", "model.onnx"])
def test_local_path_is_returned_unchanged(server: Server, cache: Path, model: str) -> None:
    assert downloads.local_model_file(model) == Path(model)
    assert server.requests == []
    assert files_in(cache) == []


def test_corrupted_cached_file_is_refused_with_its_path(server: Server, cache: Path) -> None:
    url = f"{server.url}/{GOOD_NAME}"
    path = downloads.local_model_file(url, progress=False)
    path.write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1]))  # one bit flipped on disk
    with pytest.raises(downloads.DownloadError, match="delete it") as error:
        downloads.local_model_file(url, progress=False)
    assert str(path) in str(error.value)
    assert len(server.requests) == 1  # refused, not silently downloaded again
