"""Fetch a checkpoint over HTTP(S) into the cache: once, resumable, verified, atomic.

``fetch(url, dest)`` (used by :func:`src.zoo.resolve`):

- a file lock ``<dest>.lock`` (``fcntl.flock``) makes concurrent callers (the processes of a
  ``torchrun`` node, two jobs sharing a cache) wait for the one that downloads, then find the file;
- the bytes go to ``<dest>.part``; a ``.part`` left by an interrupted attempt is resumed with an HTTP
  ``Range`` request (restarted from zero when the server ignores the range);
- SHA-256 (and the 8-digit md5 prefix the MoCo README publishes) are computed while streaming and
  compared with the expected values when known; a mismatch deletes the ``.part``;
- only a complete, verified file is fsynced and moved to ``dest`` with ``os.replace``. ``dest`` either
  does not exist or is the whole file: a ``.part`` is never returned and
  :func:`src.checkpoint.load_checkpoint` refuses one.

Every failure (HTTP error, a server that keeps closing the connection, a hash mismatch, an HTML page
instead of a file) is one :class:`~src.errors.UserError` line.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request

from .errors import UserError

log = logging.getLogger("ssl")

CHUNK = 1 << 20
RETRY_SLEEP = 0.5      # seconds before the 2nd attempt, growing linearly (at most 5)
USER_AGENT = "ssl-zoo/1.0 (python urllib)"


def cache_dir() -> str:
    """``$SSL_CACHE``, else ``$XDG_CACHE_HOME/ssl_zoo``, else ``~/.cache/ssl_zoo``."""
    if os.environ.get("SSL_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["SSL_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.abspath(os.path.join(os.path.expanduser(base), "ssl_zoo"))


class _Interrupted(Exception):
    """The transfer stopped before the end: retry, resuming the ``.part``."""


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive ``flock`` on ``path`` (created); yields False where the filesystem has no locks."""
    import fcntl
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on some network filesystems
            log.warning("no file lock on %s (%s): using a private partial file", path, e)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Hashes:
    def __init__(self) -> None:
        self.sha256, self.md5 = hashlib.sha256(), hashlib.md5()

    def update(self, b: bytes) -> None:
        self.sha256.update(b)
        self.md5.update(b)

    @classmethod
    def of_file(cls, path: str) -> _Hashes:
        h = cls()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        return h


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None  # the partial file is not a prefix the server knows: start again
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Interrupted(f"cannot connect: {reason}") from None


def _total(resp, offset: int) -> tuple[int | None, bool]:
    """(size of the whole file or None, whether the response continues at ``offset``)."""
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            return None, False
        return (None if m.group(2) == "*" else int(m.group(2))), True
    length = resp.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), False


def _attempt(url: str, part: str, timeout: float, progress: bool) -> _Hashes:
    """One transfer into ``part`` (appending when it exists and the server honours the range)."""
    from tqdm import tqdm
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    resp = _open(url, offset, timeout)
    if resp is None:
        os.unlink(part)
        offset = 0
        resp = _open(url, 0, timeout)
    with resp:
        if "text/html" in resp.headers.get("Content-Type", ""):
            raise UserError(f"{url} returned an HTML page, not a checkpoint (a host that needs a browser or a "
                            "login?): download the file by hand and pass its path")
        total, resumed = _total(resp, offset)
        if offset and not resumed:
            offset = 0  # the server sent the whole file
        hashes = _Hashes.of_file(part) if offset else _Hashes()
        done = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0,
                   desc=os.path.basename(part)[:-len(".part")], disable=not progress, leave=False)
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                        raise _Interrupted(f"{type(e).__name__} after {done} bytes") from None
                    if not block:
                        break
                    f.write(block)
                    hashes.update(block)
                    done += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    if total is not None and done != total:
        raise _Interrupted(f"connection closed at {done} of {total} bytes")
    return hashes


def _verify(url: str, hashes: _Hashes, sha256: str | None, md5: str | None) -> None:
    got = hashes.sha256.hexdigest()
    if sha256 and got != sha256.lower():
        raise UserError(f"SHA-256 mismatch for {url}: expected {sha256.lower()}, got {got} (the download was "
                        "deleted; the file on the server changed or the transfer was corrupted)")
    got_md5 = hashes.md5.hexdigest()
    if md5 and not got_md5.startswith(md5.lower()):
        raise UserError(f"md5 mismatch for {url}: expected {md5.lower()}..., got {got_md5} (the download was deleted)")


def fetch(url: str, dest: str, *, sha256: str | None = None, md5: str | None = None, attempts: int = 3,
          timeout: float = 60.0, progress: bool = True) -> str:
    """Download ``url`` to ``dest`` unless it is already there (module docstring); returns ``dest``.
    ``attempts`` transfers are tried, each resuming the previous one's ``.part``."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with file_lock(dest + ".lock") as locked:
        if os.path.isfile(dest):
            return dest
        part = dest + ".part" if locked else f"{dest}.{socket.gethostname()}-{os.getpid()}.part"
        log.info("downloading %s to %s", url, dest)
        why = ""
        for i in range(max(attempts, 1)):
            if i:
                log.warning("download of %s interrupted (%s); attempt %d of %d resumes it", url, why, i + 1, attempts)
                time.sleep(min(RETRY_SLEEP * i, 5.0))
            try:
                hashes = _attempt(url, part, timeout, progress)
                break
            except _Interrupted as e:
                why = str(e)
        else:
            kept = f"{os.path.getsize(part)} bytes kept in {part}, resumed by the next run" if os.path.isfile(part) else ""
            raise UserError(f"download of {url} failed after {attempts} attempts ({why}){'; ' + kept if kept else ''}")
        try:
            _verify(url, hashes, sha256, md5)
        except UserError:
            os.unlink(part)
            raise
        os.replace(part, dest)
    log.info("downloaded %s (%d bytes, sha256 %s)", dest, os.path.getsize(dest), hashes.sha256.hexdigest())
    return dest
