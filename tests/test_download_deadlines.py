"""Downloads end: a server that sends a byte now and then is given up by a deadline from
the size, and the temporary files of downloads that died are cleaned up."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from seglab import downloads

NAME = "m-0123abcd.pt"


class Trickle(BaseHTTPRequestHandler):
    """Sends one byte every 50 ms, announcing 100 kB (/sized) or no size (/unsized)."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.send_response(200)
        if self.path.startswith("/sized/"):
            self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100_000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output quiet."""


@pytest.fixture
def trickle_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("kind", ["sized", "unsized"])
def test_a_trickling_server_is_given_up_by_a_deadline(trickle_url, cache, monkeypatch, kind):
    # 1 s of silence allowed, and 100 kB/s: 2 s for the 100 kB announced, 1 s without a size.
    monkeypatch.setattr(downloads, "DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(downloads, "MIN_DOWNLOAD_RATE", 100_000)
    start = time.monotonic()
    with pytest.raises(downloads.DownloadError, match="too slow") as error:
        downloads.local_model_file(f"{trickle_url}/{kind}/{NAME}", progress=False)
    assert time.monotonic() - start < 10
    assert "nothing was written" in str(error.value)
    assert list(cache.iterdir()) == []


def test_stale_partial_files_are_removed_and_live_ones_kept(trickle_url, cache, monkeypatch):
    cache.mkdir(parents=True)
    stale = cache / f".{NAME}.4242.0badf00d.partial"
    live = cache / f".{NAME}.{os.getpid()}.12345678.partial"
    for path in (stale, live):
        path.write_bytes(b"half a file")
    old = time.time() - downloads.STALE_PARTIAL_SECONDS - 60
    os.utime(stale, (old, old))
    monkeypatch.setattr(downloads, "DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(downloads, "MIN_DOWNLOAD_RATE", 100_000)
    with pytest.raises(downloads.DownloadError):
        downloads.local_model_file(f"{trickle_url}/unsized/{NAME}", progress=False)
    assert sorted(path.name for path in cache.iterdir()) == [live.name]
