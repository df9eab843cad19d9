"""A small Hugging Face Hub look-alike served on loopback, for tests that must not reach the internet.

The real ``huggingface_hub`` client (and libraries built on it: transformers, timm) talks to this server over
plain HTTP, so the code under test runs its real network paths: auth headers, error mapping, the LFS upload
dance, the download cache. Nothing in ``huggingface_hub`` is patched.

Only model repos are served. State (repos, commits, refs, discussions, LFS objects) lives in memory and is
git-like: every commit has a 40-hex sha, a parent and a full file tree; refs are ``refs/heads/*``,
``refs/tags/*`` and ``refs/pr/N``.

Pointing code at the server
---------------------------
``huggingface_hub.constants.ENDPOINT`` is read from ``HF_ENDPOINT`` once, when ``huggingface_hub`` is
imported, so setting the variable inside an already running test process has no effect. Therefore:

* in-process code must receive the endpoint explicitly: ``HfApi(endpoint=hub.endpoint, token=...)``,
  ``hf_hub_download(..., endpoint=hub.endpoint)``, ``snapshot_download(..., endpoint=hub.endpoint)``;
  ``hub.api(token)`` builds such an ``HfApi``;
* library code that only honours ``HF_ENDPOINT`` (``transformers.AutoConfig.from_pretrained``, ``timm``'s
  ``hf-hub:`` loader, a CLI) must run in a subprocess started with ``env={**os.environ, **hub.env}``.
  ``hub.env`` carries ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1`` (uploads would otherwise go through Xet,
  which this server does not speak), ``HF_HUB_DISABLE_TELEMETRY=1``, a private ``HF_HOME`` (fresh cache,
  no stored token) and ``NO_PROXY`` for loopback. Add ``HF_TOKEN`` yourself when the child must be
  authenticated.

In-process calls should pass ``token=`` explicitly (a token from ``hub.tokens`` or ``False``): with
``token=None`` the client may send a token stored on the developer's machine, which this server rejects as
invalid credentials.

Behaviour worth knowing
-----------------------
* Files are stored as LFS when their name has a usual binary suffix (``*.safetensors``, ``*.bin``, ...) or
  they exceed 10 MiB; their ``ETag`` is the sha256 and ``X-Linked-Etag``/``X-Linked-Size`` are set. Other
  files get the git blob sha1 as ``ETag``. Files are served directly (no redirect to a CDN).
* Anonymous access to a private or missing repo answers 401 ``RepoNotFound`` (404 when authenticated), like
  the Hub. Gated repos expose metadata to everyone but files only to their namespace and to users granted
  with ``grant_access``: 401 ``GatedRepo`` when anonymous, 403 ``GatedRepo`` otherwise.
* An unknown token is answered 401 ``Invalid credentials in Authorization header`` on every endpoint.
* Writing needs a ``write`` token of the repo's namespace (user or org); opening a pull request
  (``create_pr``) needs any ``write`` token that can read the repo.
* ``rate_limit(n)`` makes the next ``n`` matching requests answer 429 with ``Retry-After``. The client
  retries 429 on some endpoints (``list_models``, preupload, LFS) after ``Retry-After + 1`` seconds, but
  not on ``model_info``/``create_commit``. ``hf_hub_download`` serves a cached copy when its HEAD call fails,
  and retries the HEAD with backoff when nothing is cached.
* ``drop_connection(after_bytes, times=1)`` cuts the next file downloads after ``after_bytes`` bytes of the
  body (socket shut down, or reset with ``reset=True``), for tests of interrupted downloads. The client
  (``http_get``) resumes with a ``Range`` request only after a body that ends early (not after a reset), and
  only from whole 10 MiB chunks it has written: cut a file above 10 MiB after more than 10 MiB to see one.
  ``RequestRecord.range`` and ``RequestRecord.dropped_after`` show what happened.
* ``create_repo`` makes an initial commit holding ``.gitattributes`` (as the Hub does); ``add_repo`` seeds
  exactly the files given.
* Not implemented: datasets/spaces, Xet, pagination (everything fits one page), ``expand`` on the tree
  endpoint, merging/closing pull requests through the API, the LFS ``verify`` action, repo settings.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

__all__ = ["HubServer", "HubTokens", "Commit", "Discussion", "Repo", "RequestRecord", "hub_server"]

LFS_SUFFIXES: tuple[str, ...] = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy", ".npz", ".pkl",
    ".pickle", ".joblib", ".zip", ".gz", ".tgz", ".tar", ".bz2", ".xz", ".zst", ".7z", ".arrow", ".parquet",
    ".tflite", ".pb", ".ot", ".gguf", ".mlmodel", ".model", ".wasm",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_SHA40 = re.compile(r"[0-9a-f]{40}")


def is_lfs_path(path: str, size: int) -> bool:
    """Whether the Hub would store this file with LFS (binary suffix or too big for a git blob)."""
    return path.lower().endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD


def _iso(moment: datetime) -> str:
    """Timestamp in the Hub's format, e.g. ``2024-05-01T12:00:00.123Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Storage model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """File content plus the identifiers the Hub derives from it."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # git sha1 of the blob; for LFS files, of the pointer file (what git stores)

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        stored = _lfs_pointer(sha256, len(data)) if lfs else data
        return cls(data=data, lfs=lfs, sha256=sha256, git_oid=_git_blob_sha1(stored))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """What ``/resolve`` reports and the client uses as blob name in its cache."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def upload_oid(self) -> str:
        """What ``preupload`` reports; the client skips files whose local oid equals it."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Commit:
    """One immutable snapshot of a repo."""

    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Discussion:
    """A discussion or pull request; pull requests point at ``refs/pr/{num}``."""

    num: int
    title: str
    author: str
    is_pull_request: bool
    created_at: datetime
    description: str = ""
    status: str = "open"
    target_branch: str | None = None  # full ref, e.g. "refs/heads/main"
    commits: list[str] = field(default_factory=list)

    @property
    def git_reference(self) -> str | None:
        return f"refs/pr/{self.num}" if self.is_pull_request else None


@dataclass
class Repo:
    """A model repo: metadata, commits, refs, discussions and the LFS objects uploaded to it."""

    repo_id: str
    private: bool = False
    gated: bool | str = False
    tags: list[str] = field(default_factory=list)
    library_name: str | None = None
    pipeline_tag: str | None = None
    created_at: datetime = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, Discussion] = field(default_factory=dict)
    granted: set[str] = field(default_factory=set)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit | None:
        """Git-like lookup: full ref, branch, tag, then full commit sha."""
        for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if ref.startswith("refs/") and ref in self.refs:
                return self.commits[self.refs[ref]]
        if _SHA40.fullmatch(revision):
            return self.commits.get(revision)
        return None

    def history(self, sha: str) -> list[Commit]:
        """Commits reachable from ``sha``, newest first."""
        out: list[Commit] = []
        current: str | None = sha
        while current is not None:
            commit = self.commits[current]
            out.append(commit)
            current = commit.parent
        return out


@dataclass(frozen=True)
class HubTokens:
    """Tokens known to a fresh server."""

    write: str = "hf_alice_write_0000000000000000000000"  # user "alice", role write
    read: str = "hf_alice_read_00000000000000000000000"  # user "alice", role read
    other: str = "hf_bob_write_000000000000000000000000"  # user "bob", role write
    invalid: str = "hf_not_a_known_token_0000000000000000"  # rejected everywhere


@dataclass(frozen=True)
class _Token:
    value: str
    user: str
    role: str  # "read" or "write"


@dataclass
class RequestRecord:
    """One request as the server saw it; ``status`` is filled in after it is answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    user: str | None
    sent_authorization: bool
    status: int = 0
    range: str | None = None  # the ``Range`` header, when one was sent
    dropped_after: int | None = None  # body bytes sent before the connection was cut (``drop_connection``)


# --------------------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    method: str
    path: str  # still percent-encoded
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise _HttpError(400, f"Invalid JSON body: {err}") from err


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # fault injection: send this many body bytes, then cut the connection
    reset: bool = False  # ... with a TCP reset instead of a plain close


@dataclass
class _Fault:
    """A pending ``drop_connection``: which downloads to cut, after how many bytes, how many more times."""

    after_bytes: int
    remaining: int
    path_contains: str | None
    reset: bool


def _json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


class _HttpError(Exception):
    """Raised by handlers; becomes an error response carrying the Hub's error headers."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json_response({"error": self.message}, self.status, headers)


class _Handler(BaseHTTPRequestHandler):
    """Turns raw HTTP into ``_Request`` objects for ``HubServer.dispatch`` and writes the answer back."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects from the Hub
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # keep test output clean; `HubServer.requests` records traffic instead

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        request = _Request(method, split.path, parse_qs(split.query), self.headers, self._read_body())
        response = self.server.hub.dispatch(request)
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if method == "HEAD":
                return
            if response.drop_after is None:
                self.wfile.write(response.body)
                return
            # Fault injection: part of the body, then the connection goes away mid-transfer.
            self.wfile.write(response.body[: response.drop_after])
            self.wfile.flush()
            self.close_connection = True
            if response.reset:  # RST instead of FIN: the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)


# --------------------------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------------------------

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_Route = tuple[str, "re.Pattern[str]", Callable[..., _Response]]


class HubServer:
    """In-memory Hub on ``127.0.0.1:<free port>``; use as a context manager or via ``start()``/``stop()``."""

    def __init__(self, hf_home: str | Path | None = None) -> None:
        self.hf_home = Path(hf_home) if hf_home is not None else None
        self.tokens = HubTokens()
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[_Route] = self._build_routes()
        self.reset()

    # ----- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        for conn in list(self._server.connections):  # unblock handler threads parked on keep-alive sockets
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a child process (transformers, timm, a CLI) at this server."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        if self.hf_home is not None:
            env["HF_HOME"] = str(self.hf_home)
        return env

    def api(self, token: str | bool | None = None) -> Any:
        """An ``HfApi`` bound to this server (imported lazily so this module never fixes ``HF_ENDPOINT``)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token)

    def reset(self) -> None:
        """Forget all repos, uploads, extra users, pending rate limits and the request log."""
        with self._lock:
            self._repos: dict[str, Repo] = {}
            self._orgs: dict[str, set[str]] = {"alice": set(), "bob": set()}
            self._tokens: dict[str, _Token] = {
                t.value: t
                for t in (
                    _Token(self.tokens.write, "alice", "write"),
                    _Token(self.tokens.read, "alice", "read"),
                    _Token(self.tokens.other, "bob", "write"),
                )
            }
            self._pending_uploads: dict[str, tuple[str, str, int]] = {}
            self._rate_limit: tuple[int, int, str | None] = (0, 0, None)
            self._faults: list[_Fault] = []
            self._hooks: list[tuple[str, Callable[[], None]]] = []
            self._lost_answers: list[tuple[str, int]] = []
            self._counter = itertools.count(1)
            self.requests: list[RequestRecord] = []

    # ----- seeding and inspection (test side) ----------------------------------------------------------------

    def add_user(self, name: str, *, role: str = "write", orgs: Iterable[str] = ()) -> str:
        """Register a user (or one more token for it) and return the new token."""
        with self._lock:
            token = f"hf_{name}_{role}_{secrets.token_hex(8)}"
            self._tokens[token] = _Token(token, name, role)
            self._orgs.setdefault(name, set()).update(orgs)
            return token

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path] | None = None,
        *,
        private: bool = False,
        gated: bool | str = False,
        card_data: Mapping[str, Any] | None = None,
        readme: str | None = None,
        tags: Iterable[str] = (),
        library_name: str | None = None,
        pipeline_tag: str | None = None,
        message: str = "initial commit",
    ) -> str:
        """Create a repo whose ``main`` holds exactly ``files``; return the commit sha.

        ``str`` values are text content, ``Path`` values are read from disk. ``card_data`` and/or ``readme``
        become ``README.md`` (YAML front matter + body), from which ``model_info().card_data`` is derived.
        ``gated=True`` means ``"auto"``. The author is the namespace of ``repo_id``.
        """
        _check_repo_id(repo_id)
        contents = {path: _to_bytes(value) for path, value in (files or {}).items()}
        if card_data is not None or readme is not None:
            if "README.md" in contents:
                raise ValueError("pass README.md either in files or as card_data/readme, not both")
            contents["README.md"] = _render_readme(card_data, readme or "").encode()
        with self._lock:
            if self._find(repo_id) is not None:
                raise ValueError(f"repo {repo_id} already exists")
            repo = Repo(
                repo_id=repo_id,
                private=private,
                gated="auto" if gated is True else gated,
                tags=list(tags),
                library_name=library_name,
                pipeline_tag=pipeline_tag,
            )
            self._repos[repo_id] = repo
            blobs = {path: self._store_blob(repo, data, path) for path, data in contents.items()}
            commit = self._new_commit(repo, None, blobs, message, "", repo.namespace)
            repo.refs["refs/heads/main"] = commit.sha
            return commit.sha

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path] | None = None,
        *,
        delete: Iterable[str] = (),
        revision: str = "main",
        message: str = "update",
    ) -> str:
        """Add/overwrite ``files`` and remove ``delete`` on a branch (or ``refs/pr/N``); return the new sha."""
        with self._lock:
            repo = self.repo(repo_id)
            ref = self._writable_ref(repo, revision)
            parent = repo.commits[repo.refs[ref]]
            blobs = dict(parent.files)
            for path in delete:
                del blobs[path]
            for path, value in (files or {}).items():
                blobs[path] = self._store_blob(repo, _to_bytes(value), path)
            commit = self._new_commit(repo, parent.sha, blobs, message, "", repo.namespace)
            repo.refs[ref] = commit.sha
            return commit.sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> str:
        """Create ``refs/heads/{branch}`` at ``revision``; return its sha."""
        return self._add_ref(repo_id, f"refs/heads/{branch}", revision)

    def create_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Create ``refs/tags/{tag}`` at ``revision``; return its sha."""
        return self._add_ref(repo_id, f"refs/tags/{tag}", revision)

    def grant_access(self, repo_id: str, user: str) -> None:
        """Let ``user`` download from a gated repo."""
        with self._lock:
            self.repo(repo_id).granted.add(user)

    def rate_limit(self, count: int, *, retry_after: int = 0, path_contains: str | None = None) -> None:
        """Answer the next ``count`` requests (whose decoded path contains ``path_contains``) with 429."""
        with self._lock:
            self._rate_limit = (count, retry_after, path_contains)

    def drop_connection(
        self, after_bytes: int, *, times: int = 1, path_contains: str | None = None, reset: bool = False
    ) -> None:
        """Cut the next ``times`` file downloads (GET ``/resolve/``, decoded path containing ``path_contains``)
        after ``after_bytes`` bytes of the body; ``Content-Length`` still announces the whole file.

        The socket is shut down (the client sees the body end early) or, with ``reset=True``, reset. A call
        replaces earlier pending faults; ``drop_connection(0, times=0)`` clears them. Cut requests are
        recorded with ``RequestRecord.dropped_after``.
        """
        with self._lock:
            self._faults = [_Fault(after_bytes, times, path_contains, reset)] if times > 0 else []

    def before_request(self, path_contains: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, just before answering the next request whose decoded path contains
        ``path_contains`` (for example a commit, to move a branch between two calls of the client)."""
        with self._lock:
            self._hooks.append((path_contains, action))

    def lose_answer(self, path_contains: str, status: int = 504) -> None:
        """Carry out the next request whose decoded path contains ``path_contains``, then answer it
        with ``status`` instead of its result, once: a gateway timeout after a commit landed."""
        with self._lock:
            self._lost_answers.append((path_contains, status))

    def repo(self, repo_id: str) -> Repo:
        """The live ``Repo`` object (raises ``KeyError``); read it, don't mutate it from other threads."""
        with self._lock:
            return self._repos[repo_id]

    def repo_ids(self) -> list[str]:
        with self._lock:
            return list(self._repos)

    def head(self, repo_id: str, revision: str = "main") -> str:
        """Commit sha that ``revision`` resolves to."""
        return self._resolve(repo_id, revision).sha

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """History of ``revision``, newest first (the first entry is the head)."""
        with self._lock:
            return self.repo(repo_id).history(self._resolve(repo_id, revision).sha)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content at ``revision``."""
        return {path: blob.data for path, blob in self._resolve(repo_id, revision).files.items()}

    def refs(self, repo_id: str) -> dict[str, str]:
        """Full ref name (``refs/heads/main``, ``refs/tags/v1``, ``refs/pr/1``) -> sha."""
        with self._lock:
            return dict(self.repo(repo_id).refs)

    def discussions(self, repo_id: str) -> list[Discussion]:
        with self._lock:
            return list(self.repo(repo_id).discussions.values())

    def _resolve(self, repo_id: str, revision: str) -> Commit:
        with self._lock:
            commit = self.repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}@{revision}")
            return commit

    def _add_ref(self, repo_id: str, ref: str, revision: str) -> str:
        with self._lock:
            repo = self.repo(repo_id)
            if ref in repo.refs:
                raise ValueError(f"{ref} already exists in {repo_id}")
            repo.refs[ref] = self._resolve(repo_id, revision).sha
            return repo.refs[ref]

    # ----- storage helpers (call with the lock held) ---------------------------------------------------------

    def _store_blob(self, repo: Repo, data: bytes, path: str | None = None, *, lfs: bool | None = None) -> Blob:
        blob = Blob.make(data, is_lfs_path(path or "", len(data)) if lfs is None else lfs)
        if blob.lfs:
            repo.lfs_objects[blob.sha256] = data
        return blob

    def _new_commit(
        self, repo: Repo, parent: str | None, files: Mapping[str, Blob], title: str, message: str, author: str
    ) -> Commit:
        tree = "".join(f"{path}\0{blob.git_oid}\n" for path, blob in sorted(files.items()))
        seed = f"{next(self._counter)}\n{repo.repo_id}\n{parent}\n{title}\n{message}\n{author}\n{tree}"
        commit = Commit(
            sha=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            files=dict(files),
            title=title,
            message=message,
            author=author,
            date=_now(),
        )
        repo.commits[commit.sha] = commit
        return commit

    def _writable_ref(self, repo: Repo, revision: str) -> str:
        """Full ref a commit to ``revision`` updates; branches and existing PR refs only."""
        for ref in (revision, f"refs/heads/{revision}"):
            if ref.startswith(("refs/heads/", "refs/pr/")) and ref in repo.refs:
                return ref
        if repo.resolve(revision) is not None:
            raise _HttpError(400, f"Invalid rev id: {revision} is not a branch")
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # ----- dispatch ------------------------------------------------------------------------------------------

    def dispatch(self, request: _Request) -> _Response:
        """Answer one request: rate limit, authentication, then the matching route."""
        with self._lock:
            decoded_path = unquote(request.path)
            record = RequestRecord(
                request.method,
                decoded_path,
                request.query,
                None,
                request.headers.get("Authorization") is not None,
                range=request.headers.get("Range"),
            )
            self.requests.append(record)
            for hook in [h for h in self._hooks if h[0] in decoded_path]:
                self._hooks.remove(hook)
                hook[1]()
            response = self._dispatch_locked(request, decoded_path, record)
            lost = next((x for x in self._lost_answers if x[0] in decoded_path), None)
            if lost is not None and response.status < 400:
                self._lost_answers.remove(lost)
                response = _json_response({"error": "Gateway Timeout"}, lost[1])
            record.status = response.status
            self._inject_fault(request, decoded_path, record, response)
            return response

    def _inject_fault(self, request: _Request, decoded_path: str, record: RequestRecord, response: _Response) -> None:
        """Mark a successful file download for ``drop_connection``'s cut (the handler does the cutting)."""
        if request.method != "GET" or "/resolve/" not in decoded_path or response.status not in (200, 206):
            return
        for fault in self._faults:
            if fault.remaining > 0 and (fault.path_contains is None or fault.path_contains in decoded_path):
                if fault.after_bytes >= len(response.body):
                    return  # nothing left to cut: the body goes out whole
                fault.remaining -= 1
                response.drop_after, response.reset = fault.after_bytes, fault.reset
                record.dropped_after = fault.after_bytes
                return

    def _dispatch_locked(self, request: _Request, decoded_path: str, record: RequestRecord) -> _Response:
        remaining, retry_after, path_filter = self._rate_limit
        if remaining > 0 and (path_filter is None or path_filter in decoded_path):
            self._rate_limit = (remaining - 1, retry_after, path_filter)
            return _HttpError(
                429,
                "You have been rate-limited; you can retry later.",
                headers={
                    "Retry-After": str(retry_after),
                    "RateLimit": f'"api";r=0;t={retry_after}',
                    "RateLimit-Policy": '"fixed window";"api";q=1000;w=300',
                },
            ).response()
        try:
            for method, pattern, handler in self._routes:
                match = pattern.match(request.path)
                if match is None or method != request.method:
                    continue
                if handler == self._lfs_upload:  # presigned: no Hub credentials involved
                    return handler(request, None, **match.groupdict())
                token = self._authenticate(request)
                record.user = token.user if token else None
                return handler(request, token, **match.groupdict())
            return _json_response({"error": "Sorry, we can't find the page you are looking for."}, 404)
        except _HttpError as err:
            return err.response()

    def _build_routes(self) -> list[_Route]:
        api = f"^/api/models/{_REPO}"
        table: list[tuple[str, str, Callable[..., _Response]]] = [
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("GET", r"^/api/models/?$", self._list_models),
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("DELETE", r"^/api/repos/delete$", self._delete_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("GET", api + r"(?:/revision/(?P<rev>.+))?$", self._model_info),
            ("GET", api + r"/tree/(?P<rest>.+)$", self._tree),
            ("POST", api + r"/paths-info/(?P<rev>.+)$", self._paths_info),
            ("GET", api + r"/refs$", self._list_refs),
            ("GET", api + r"/commits/(?P<rev>.+)$", self._list_commits),
            ("POST", api + r"/preupload/(?P<rev>.+)$", self._preupload),
            ("POST", api + r"/commit/(?P<rev>.+)$", self._commit),
            ("POST", api + r"/branch/(?P<rev>.+)$", self._create_branch),
            ("DELETE", api + r"/branch/(?P<rev>.+)$", self._delete_branch),
            ("POST", api + r"/tag/(?P<rev>.+)$", self._create_tag),
            ("DELETE", api + r"/tag/(?P<rev>.+)$", self._delete_tag),
            ("GET", api + r"/discussions$", self._list_discussions),
            ("GET", api + r"/discussions/(?P<num>\d+)$", self._discussion_details),
            ("POST", f"^/{_REPO}" + r"\.git/info/lfs/objects/batch$", self._lfs_batch),
            ("PUT", r"^/__lfs__/(?P<sig>[0-9a-f]+)$", self._lfs_upload),
            ("GET", f"^/{_REPO}" + r"/resolve/(?P<rest>.+)$", self._resolve_file),
            ("HEAD", f"^/{_REPO}" + r"/resolve/(?P<rest>.+)$", self._resolve_file),
        ]
        return [(method, re.compile(pattern), handler) for method, pattern, handler in table]

    # ----- access control ------------------------------------------------------------------------------------

    def _authenticate(self, request: _Request) -> _Token | None:
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return token

    def _find(self, repo_id: str) -> Repo | None:
        """The repo under any letter case, as the Hub resolves ids (its answers give the repo's own spelling)."""
        repo = self._repos.get(repo_id)
        if repo is None:
            repo = next((r for key, r in self._repos.items() if key.lower() == repo_id.lower()), None)
        return repo

    def _is_member(self, token: _Token | None, namespace: str) -> bool:
        return token is not None and (token.user == namespace or namespace in self._orgs.get(token.user, set()))

    def _readable_repo(self, token: _Token | None, ns: str, name: str) -> Repo:
        """The repo if the caller may see it; otherwise the Hub's "not found" (401 anonymous, 404 signed in)."""
        repo = self._find(f"{unquote(ns)}/{unquote(name)}")
        if repo is None or (repo.private and not self._is_member(token, repo.namespace)):
            raise _HttpError(
                401 if token is None else 404,
                "Repository not found",
                "RepoNotFound",
            )
        return repo

    def _require_write(self, token: _Token | None, namespace: str | None) -> _Token:
        """A write token, of ``namespace`` when given (None: any namespace, e.g. to open a pull request)."""
        if token is None:
            raise _HttpError(401, "You must be authenticated to do this. Please provide a token.")
        if token.role != "write":
            raise _HttpError(403, "You don't have the rights to perform this action: this token is read-only")
        if namespace is not None and not self._is_member(token, namespace):
            raise _HttpError(403, f"You don't have the rights to write in the namespace '{namespace}'")
        return token

    def _check_gate(self, token: _Token | None, repo: Repo) -> None:
        if not repo.gated or self._is_member(token, repo.namespace) or (token and token.user in repo.granted):
            return
        if token is None:
            message = f"Access to model {repo.repo_id} is restricted. You must be authenticated to access it."
            raise _HttpError(401, message, "GatedRepo")
        message = f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
        raise _HttpError(403, message, "GatedRepo")

    @staticmethod
    def _commit_at(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ----- JSON views ----------------------------------------------------------------------------------------

    def _model_json(self, repo: Repo, commit: Commit, *, full: bool, blobs: bool = False) -> dict[str, Any]:
        card = _card_data(commit)
        library = repo.library_name or card.get("library_name")
        pipeline = repo.pipeline_tag or card.get("pipeline_tag")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.namespace,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": _tags(repo, card, library, pipeline),
            "pipeline_tag": pipeline,
            "library_name": library,
            "createdAt": _iso(repo.created_at),
        }
        if full:
            info.update(
                sha=commit.sha,
                lastModified=_iso(commit.date),
                siblings=[_sibling(path, blob, blobs) for path, blob in sorted(commit.files.items())],
                spaces=[],
                usedStorage=sum(blob.size for blob in commit.files.values()),
            )
            if card:
                info["cardData"] = card
        return info

    # ----- endpoints -----------------------------------------------------------------------------------------

    def _whoami(self, request: _Request, token: _Token | None) -> _Response:
        if token is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in self._orgs[token.user]]
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(token.user.encode()).hexdigest()[:24],
                "name": token.user,
                "fullname": token.user.capitalize(),
                "email": f"{token.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": f"{token.role}-token", "role": token.role},
                },
            }
        )

    def _list_models(self, request: _Request, token: _Token | None) -> _Response:
        author, search = request.param("author"), (request.param("search") or "").lower()
        filters = request.query.get("filter", [])
        pipeline, gated = request.param("pipeline_tag"), request.param("gated")
        full = request.flag("full")
        out: list[dict[str, Any]] = []
        for repo in self._repos.values():
            if repo.private and not self._is_member(token, repo.namespace):
                continue
            info = self._model_json(repo, repo.commits[repo.refs["refs/heads/main"]], full=True)
            if author and repo.namespace != author:
                continue
            if search and search not in repo.repo_id.lower():
                continue
            if not all(f in info["tags"] for f in filters):
                continue
            if pipeline and info["pipeline_tag"] != pipeline:
                continue
            if gated is not None and bool(repo.gated) != (gated.lower() == "true"):
                continue
            if not full:
                info = {k: v for k, v in info.items() if k not in ("siblings", "sha", "lastModified", "cardData")}
            if not (request.flag("cardData") or full):
                info.pop("cardData", None)
            out.append(info)
        sort = request.param("sort")
        if sort:
            out.sort(key=lambda item: item.get(sort) or 0, reverse=request.param("direction") != "1")
        limit = request.param("limit")
        if limit is not None:
            out = out[: int(limit)]
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        if expand:
            out = [{"_id": i["_id"], "id": i["id"], **{k: i[k] for k in expand if k in i}} for i in out]
        return _json_response(out)

    def _create_repo(self, request: _Request, token: _Token | None) -> _Response:
        body = request.json()
        if body.get("type") not in (None, "model"):
            raise _HttpError(400, "This test Hub only serves model repos")
        if token is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        namespace = body.get("organization") or token.user
        self._require_write(token, namespace)
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if self._find(repo_id) is not None:
            return _json_response({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_id=repo_id, private=private)
        self._repos[repo_id] = repo
        attributes = {".gitattributes": self._store_blob(repo, GITATTRIBUTES.encode(), ".gitattributes")}
        commit = self._new_commit(repo, None, attributes, "initial commit", "", token.user)
        repo.refs["refs/heads/main"] = commit.sha
        return _json_response({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request, token: _Token | None) -> _Response:
        body = request.json()
        namespace = body.get("organization") or (token.user if token else "")
        repo = self._readable_repo(token, namespace, body.get("name", ""))
        self._require_write(token, repo.namespace)
        del self._repos[repo.repo_id]
        return _Response(200)

    def _validate_yaml(self, request: _Request, token: _Token | None) -> _Response:
        try:
            _card_data_from_text(request.json().get("content", ""))
        except (yaml.YAMLError, ValueError) as err:
            return _json_response({"errors": [{"message": str(err)}], "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _model_info(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str | None) -> _Response:
        repo = self._readable_repo(token, ns, name)
        commit = self._commit_at(repo, unquote(rev) if rev else "main")
        info = self._model_json(repo, commit, full=True, blobs=request.flag("blobs"))
        expand = request.query.get("expand", []) + request.query.get("expand[]", [])
        if expand:
            info = {"_id": info["_id"], "id": info["id"], **{k: info[k] for k in expand if k in info}}
        return _json_response(info)

    def _tree(self, request: _Request, token: _Token | None, ns: str, name: str, rest: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        revision, path = _split_revision(rest)
        commit = self._commit_at(repo, revision)
        path = path.strip("/")
        entries = _tree_entries(commit, path, recursive=request.flag("recursive"))
        if path and not entries and path not in _directories(commit):
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return _json_response(entries)

    def _paths_info(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        commit = self._commit_at(repo, unquote(rev))
        form = parse_qs(request.body.decode())
        dirs = _directories(commit)
        out: list[dict[str, Any]] = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path]))
            elif path in dirs:
                out.append(_dir_entry(commit, path))
        return _json_response(out)

    def _list_refs(self, request: _Request, token: _Token | None, ns: str, name: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        grouped: dict[str, list[dict[str, str]]] = {"branches": [], "tags": [], "converts": [], "pullRequests": []}
        kinds = {"refs/heads/": "branches", "refs/tags/": "tags", "refs/pr/": "pullRequests"}
        for ref, sha in sorted(repo.refs.items()):
            for prefix, kind in kinds.items():
                if ref.startswith(prefix):
                    grouped[kind].append({"name": ref[len(prefix) :], "ref": ref, "targetCommit": sha})
        if not request.flag("include_prs"):
            grouped.pop("pullRequests")
        return _json_response(grouped)

    def _list_commits(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        commits = repo.history(self._commit_at(repo, unquote(rev)).sha)
        return _json_response(
            [
                {
                    "id": c.sha,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.date),
                    "title": c.title,
                    "message": c.message,
                }
                for c in commits
            ]
        )

    def _preupload(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._require_write(token, None if request.flag("create_pr") else repo.namespace)
        commit = self._commit_at(repo, unquote(rev))
        files = []
        for item in request.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            existing = commit.files.get(path)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs_path(path, size) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.upload_oid if existing else None,
                }
            )
        return _json_response({"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, request: _Request, token: _Token | None, ns: str, name: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._require_write(token, None)  # PR authors upload too; the commit call checks the branch rights
        body = request.json()
        if body.get("operation") != "upload":
            raise _HttpError(400, "Only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                sig = secrets.token_hex(16)
                self._pending_uploads[sig] = (repo.repo_id, oid, size)
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/__lfs__/{sig}", "expires_in": 3600}}
            objects.append(entry)
        return _json_response(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, request: _Request, token: None, sig: str) -> _Response:
        pending = self._pending_uploads.get(sig)
        if pending is None:
            raise _HttpError(403, "Upload URL is invalid or expired")
        repo_id, oid, size = pending
        if len(request.body) != size or hashlib.sha256(request.body).hexdigest() != oid:
            raise _HttpError(400, "Uploaded content does not match the announced oid/size")
        repo = self._repos.get(repo_id)
        if repo is not None:
            repo.lfs_objects[oid] = request.body
        del self._pending_uploads[sig]
        return _Response(200, headers={"ETag": f'"{oid}"'})

    def _commit(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        revision, create_pr = unquote(rev), request.flag("create_pr")
        author = self._require_write(token, None if create_pr else repo.namespace).user
        if create_pr:
            base_ref = f"refs/heads/{revision.removeprefix('refs/heads/')}"
            if base_ref not in repo.refs:
                raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        else:
            base_ref = self._writable_ref(repo, revision)
        parent = repo.commits[repo.refs[base_ref]]

        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        expected_parent = header.get("parentCommit")
        if expected_parent and expected_parent != parent.sha:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(parent.files)
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"]
                files[path] = self._store_blob(repo, data if isinstance(data, bytes) else data.encode(), lfs=False)
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value["oid"])
                if data is None:
                    raise _HttpError(400, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = Blob.make(data, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(path + "/")}
            elif key != "header":
                raise _HttpError(400, f"Unsupported commit operation: {key}")

        commit = self._new_commit(
            repo, parent.sha, files, header.get("summary") or "update", header.get("description", ""), author
        )
        pr_url = None
        if create_pr:
            num = max(repo.discussions, default=0) + 1
            repo.refs[f"refs/pr/{num}"] = commit.sha
            repo.discussions[num] = Discussion(
                num=num,
                title=commit.title,
                author=author,
                is_pull_request=True,
                created_at=commit.date,
                description=commit.message,
                target_branch=base_ref,
                commits=[commit.sha],
            )
            pr_url = f"{self.endpoint}/{repo.repo_id}/discussions/{num}"
        else:
            repo.refs[base_ref] = commit.sha
            if base_ref.startswith("refs/pr/"):
                repo.discussions[int(base_ref.rsplit("/", 1)[1])].commits.append(commit.sha)
        return _json_response(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _create_branch(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._require_write(token, repo.namespace)
        ref = f"refs/heads/{unquote(rev)}"
        start = self._commit_at(repo, request.json().get("startingPoint") or "main")
        if ref in repo.refs:
            raise _HttpError(409, f"Reference already exists: {ref}")
        repo.refs[ref] = start.sha
        return _json_response({})

    def _delete_branch(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        return self._delete_ref(token, ns, name, f"refs/heads/{unquote(rev)}")

    def _create_tag(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._require_write(token, repo.namespace)
        target = self._commit_at(repo, unquote(rev))
        ref = f"refs/tags/{request.json().get('tag', '')}"
        if ref in repo.refs:
            raise _HttpError(409, f"Tag already exists: {ref}")
        repo.refs[ref] = target.sha
        return _json_response({})

    def _delete_tag(self, request: _Request, token: _Token | None, ns: str, name: str, rev: str) -> _Response:
        return self._delete_ref(token, ns, name, f"refs/tags/{unquote(rev)}")

    def _delete_ref(self, token: _Token | None, ns: str, name: str, ref: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._require_write(token, repo.namespace)
        if ref == "refs/heads/main":
            raise _HttpError(403, "You cannot delete the default branch")
        if ref not in repo.refs:
            raise _HttpError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        del repo.refs[ref]
        return _Response(200)

    def _list_discussions(self, request: _Request, token: _Token | None, ns: str, name: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        kind, status, author = request.param("type"), request.param("status"), request.param("author")
        selected = [
            d
            for d in sorted(repo.discussions.values(), key=lambda d: -d.num)
            if (kind in (None, "all") or d.is_pull_request == (kind == "pull_request"))
            and (status in (None, "all") or d.status == status)
            and (author is None or d.author == author)
        ]
        page = int(request.param("p") or 0)
        start = page * 50
        return _json_response(
            {
                "discussions": [_discussion_json(repo, d) for d in selected[start : start + 50]],
                "count": len(selected),
                "start": start,
                "numClosedDiscussions": sum(d.status == "closed" for d in selected),
            }
        )

    def _discussion_details(self, request: _Request, token: _Token | None, ns: str, name: str, num: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        discussion = repo.discussions.get(int(num))
        if discussion is None:
            raise _HttpError(404, f"Discussion {num} not found")
        events: list[dict[str, Any]] = [
            {
                "id": hashlib.sha1(f"{repo.repo_id}#{num}".encode()).hexdigest()[:24],
                "type": "comment",
                "createdAt": _iso(discussion.created_at),
                "author": {"name": discussion.author},
                "data": {
                    "edited": False,
                    "hidden": False,
                    "latest": {"raw": discussion.description, "html": discussion.description},
                },
            }
        ]
        for sha in discussion.commits:
            commit = repo.commits[sha]
            events.append(
                {
                    "id": sha[:24],
                    "type": "commit",
                    "createdAt": _iso(commit.date),
                    "author": {"name": commit.author},
                    "data": {"subject": commit.title, "oid": sha},
                }
            )
        details = _discussion_json(repo, discussion)
        details.update(events=events, filesWithConflicts=[])
        if discussion.is_pull_request:
            details["changes"] = {"base": discussion.target_branch}
        return _json_response(details)

    def _resolve_file(self, request: _Request, token: _Token | None, ns: str, name: str, rest: str) -> _Response:
        repo = self._readable_repo(token, ns, name)
        self._check_gate(token, repo)
        revision, path = _split_revision(rest)
        commit = self._commit_at(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        byte_range = request.headers.get("Range")
        if byte_range is None:
            return _Response(200, blob.data, headers)
        bounds = _parse_range(byte_range, blob.size)
        if bounds is None:
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{blob.size}"})
        first, last = bounds
        headers["Content-Range"] = f"bytes {first}-{last}/{blob.size}"
        return _Response(206, blob.data[first : last + 1], headers)


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'namespace/name', got {repo_id!r}")


def _to_bytes(value: bytes | str | Path) -> bytes:
    if isinstance(value, Path):
        return value.read_bytes()
    return value.encode() if isinstance(value, str) else bytes(value)


def _render_readme(card_data: Mapping[str, Any] | None, body: str) -> str:
    if not card_data:
        return body
    return f"---\n{yaml.safe_dump(dict(card_data), sort_keys=False)}---\n{body}"


def _card_data_from_text(text: str) -> dict[str, Any]:
    match = _FRONT_MATTER.match(text)
    if match is None:
        return {}
    data = yaml.safe_load(match.group(1)) or {}
    if not isinstance(data, dict):
        raise ValueError("README metadata must be a YAML mapping")
    return data


def _card_data(commit: Commit) -> dict[str, Any]:
    """Metadata from the README's YAML front matter, as the Hub parses it on every push."""
    readme = commit.files.get("README.md")
    if readme is None:
        return {}
    try:
        return _card_data_from_text(readme.data.decode("utf-8", errors="replace"))
    except (yaml.YAMLError, ValueError):
        return {}


def _tags(repo: Repo, card: Mapping[str, Any], library: str | None, pipeline: str | None) -> list[str]:
    """Explicit tags, then the ones the Hub derives from the card (tags, library, task, license, datasets)."""
    card_tags = card.get("tags") or []
    datasets = card.get("datasets") or []
    license_ = card.get("license")
    candidates = [
        *repo.tags,
        *(card_tags if isinstance(card_tags, list) else [card_tags]),
        library,
        pipeline,
        *(f"dataset:{d}" for d in (datasets if isinstance(datasets, list) else [datasets])),
        f"license:{license_}" if license_ else None,
    ]
    return list(dict.fromkeys(str(tag) for tag in candidates if tag))


def _sibling(path: str, blob: Blob, with_blobs: bool) -> dict[str, Any]:
    if not with_blobs:
        return {"rfilename": path}
    sibling: dict[str, Any] = {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
    if blob.lfs:
        sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": blob.pointer_size}
    return sibling


def _directories(commit: Commit) -> set[str]:
    dirs: set[str] = set()
    for path in commit.files:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
    return entry


def _dir_entry(commit: Commit, path: str) -> dict[str, Any]:
    listing = "".join(f"{p}{b.git_oid}" for p, b in sorted(commit.files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def _tree_entries(commit: Commit, path: str, *, recursive: bool) -> list[dict[str, Any]]:
    """Children of ``path`` (all descendants when ``recursive``), directories first, like the Hub."""
    prefix = f"{path}/" if path else ""
    dirs = {d for d in _directories(commit) if d.startswith(prefix)}
    if not recursive:
        dirs = {d for d in dirs if "/" not in d[len(prefix) :]}
    files = [p for p in commit.files if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])]
    return [_dir_entry(commit, d) for d in sorted(dirs)] + [_file_entry(p, commit.files[p]) for p in sorted(files)]


def _split_revision(rest: str) -> tuple[str, str]:
    """Split ``{revision}/{path}`` from a URL: revisions come percent-encoded, but accept raw ``refs/x/y``."""
    parts = rest.split("/")
    if unquote(parts[0]) == "refs" and len(parts) >= 3:
        return "/".join(unquote(p) for p in parts[:3]), unquote("/".join(parts[3:]))
    return unquote(parts[0]), unquote("/".join(parts[1:]))


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """First range of a ``bytes=`` header as inclusive bounds, or None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*(?:,.*)?", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    if match.group(1) == "":  # suffix range: last N bytes
        first, last = max(size - int(match.group(2)), 0), size - 1
    else:
        first = int(match.group(1))
        last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    return (first, last) if first <= last and first < size else None


def _discussion_json(repo: Repo, discussion: Discussion) -> dict[str, Any]:
    return {
        "num": discussion.num,
        "title": discussion.title,
        "status": discussion.status,
        "createdAt": _iso(discussion.created_at),
        "isPullRequest": discussion.is_pull_request,
        "author": {"name": discussion.author},
        "repo": {"name": repo.repo_id, "type": "model"},
        "pinned": False,
        "numComments": 1,
        "topReactions": [],
    }


# --------------------------------------------------------------------------------------------------------------
# Fixture
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A fresh, empty Hub per test (startup takes milliseconds), with its own ``HF_HOME`` for subprocesses."""
    with HubServer(hf_home=tmp_path_factory.mktemp("hf_home")) as hub:
        yield hub
