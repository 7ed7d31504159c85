"""A small HuggingFace-Hub-compatible HTTP server on 127.0.0.1 for the tests.

It speaks just enough of the protocol that ``huggingface_hub`` (2.x) uses, as read from its
source (``file_download.py``, ``_commit_api.py``, ``lfs.py``, ``hf_api.create_repo``):

Download
    ``HEAD/GET /{repo}/resolve/{revision}/{path}``. Regular files: 200 with ``ETag`` (the git blob
    id) and ``X-Repo-Commit``. LFS files: 302 to a separate *CDN* origin (another port, so the
    client does not follow it with its auth header) carrying ``X-Repo-Commit``,
    ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, as the real Hub does. No Xet headers
    (``X-Xet-Hash``, ``X-Xet-Refresh-Route``, ``Link: <...>; rel="xet-auth"``) are ever sent, so
    the client downloads over plain HTTP. Errors carry ``X-Error-Code`` (``RepoNotFound``,
    ``RevisionNotFound``, ``EntryNotFound``). The CDN honours ``Range`` (resumed downloads).

Upload
    ``POST /api/repos/create``; ``POST /api/models/{repo}/preupload/{rev}`` (answers ``lfs`` or
    ``regular`` per :attr:`FakeHub.upload_mode`); ``POST /{repo}.git/info/lfs/objects/batch``
    (basic transfer: PUT to the CDN, then a verify POST); ``POST /api/models/{repo}/commit/{rev}``
    (NDJSON: ``header``, ``file`` base64, ``lfsFile`` by sha256 oid). Xet uploads need a Xet CAS
    server, which this is not: ``/xet-write-token`` answers 501 and is logged.

Writes need ``Authorization: Bearer <token>``. Fault injection for download tests:
``corrupt`` (flip the first byte of the body, same size), ``truncate`` (never send bytes past
the middle of the file: close the connection there while announcing the full length, also on
resumed ``Range`` requests), ``truncate_once`` (the same, once), ``stall`` (send the first half
then wait for :attr:`release`). Every request is logged in :attr:`FakeHub.requests`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

TOKEN = "hf_brainbag_test_token"


@dataclass
class StoredFile:
    sha256: str
    size: int
    lfs: bool
    git_oid: str
    data: bytes | None = None  # regular files keep their bytes here; LFS ones live in FakeHub.lfs


@dataclass
class Repo:
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Hub API server plus a CDN server sharing one in-memory store."""

    def __init__(self, upload_mode: str = "lfs") -> None:
        self.upload_mode = upload_mode
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.pending: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.faults: dict[str, str] = {}  # sha256 -> "corrupt" | "truncate" | "stall"
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- direct store access for test set-up -----------------------------------------------
    def add_file(self, repo_id: str, path: str, data: bytes, lfs: bool = True) -> str:
        """Commit ``data`` as ``path`` on ``main`` without going through HTTP; return the oid."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo())
            stored = self._store(data, lfs)
            return self._commit(repo, "main", {path: stored}, f"add {path}")

    def _store(self, data: bytes, lfs: bool) -> StoredFile:
        sha = hashlib.sha256(data).hexdigest()
        if lfs:
            self.lfs[sha] = data
        return StoredFile(sha256=sha, size=len(data), lfs=lfs, git_oid=git_blob_oid(data),
                          data=None if lfs else data)

    def _commit(self, repo: Repo, branch: str, changes: dict[str, StoredFile], summary: str) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent]) if parent else {}
        files.update(changes)
        body = json.dumps([parent, summary, sorted((p, f.git_oid) for p, f in files.items())])
        oid = hashlib.sha1(body.encode()).hexdigest()
        repo.commits[oid] = files
        repo.branches[branch] = oid
        return oid

    def count(self, role: str | None = None, method: str | None = None) -> int:
        return sum(1 for r, m, _ in self.requests
                   if (role is None or r == role) and (method is None or m == method))

    def content(self, sha: str) -> bytes:
        return self.lfs[sha]


_RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|xet-write-token)/"
                  r"(?P<rev>[^/]+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        # -- helpers --------------------------------------------------------------------
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(),
                       {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str, head: bool = False,
                   extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"Content-Type": "application/json", **headers}, head=head)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return True
            self._error(401, None, "Invalid credentials in Authorization header")
            return False

        def _log(self) -> str:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((role, self.command, path))
            return path

        # -- verbs ------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def do_POST(self) -> None:
            path = self._log()
            body = self._body()
            if role != "hub":
                return self._error(404, None, f"no POST {path} on the CDN")
            if path == "/api/repos/create":
                return self._create(body)
            if path == "/lfs-verify":
                return self._verify(body)
            m = _BATCH.match(path)
            if m:
                return self._batch(m["repo"], body)
            m = _API.match(path)
            if m and m["op"] == "preupload":
                return self._preupload(m["repo"], unquote(m["rev"]), body)
            if m and m["op"] == "commit":
                return self._commit(m["repo"], unquote(m["rev"]), body)
            return self._error(404, None, f"test hub: no route for POST {path}")

        def do_PUT(self) -> None:
            path = self._log()
            body = self._body()
            m = re.match(r"^/upload/(?P<sha>[0-9a-f]{64})$", path)
            if role != "cdn" or not m:
                return self._error(404, None, f"test hub: no route for PUT {path}")
            with hub.lock:
                hub.pending[m["sha"]] = body
            self._send(200)

        # -- download ---------------------------------------------------------------------
        def _get(self, head: bool) -> None:
            path = self._log()
            if role == "cdn":
                m = re.match(r"^/lfs/(?P<sha>[0-9a-f]{64})$", path)
                if not m or m["sha"] not in hub.lfs:
                    return self._error(404, None, "no such object", head=head)
                return self._serve_blob(m["sha"], hub.lfs[m["sha"]], head)
            m = _API.match(path)
            if m and m["op"] == "xet-write-token":
                return self._error(501, None, "this test hub has no Xet storage", head=head)
            m = _RESOLVE.match(path)
            if not m:
                return self._error(404, None, f"test hub: no route for {self.command} {path}",
                                   head=head)
            repo = hub.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", head=head)
            rev = m["rev"]
            commit = repo.branches.get(rev, rev if rev in repo.commits else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            stored = repo.commits[commit].get(m["path"])
            if stored is None:
                return self._error(404, "EntryNotFound", "Entry not found", head=head,
                                   extra={"X-Repo-Commit": commit})
            if stored.lfs:
                location = f"{hub.cdn_url}/lfs/{stored.sha256}"
                return self._send(302, b"", {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "ETag": f'"{stored.git_oid}"',
                    "X-Linked-Etag": f'"{stored.sha256}"',
                    "X-Linked-Size": str(stored.size),
                }, head=head)
            assert stored.data is not None
            return self._send(200, stored.data, {
                "X-Repo-Commit": commit,
                "ETag": f'"{stored.git_oid}"',
                "Content-Type": "application/octet-stream",
            }, head=head)

        def _serve_blob(self, sha: str, data: bytes, head: bool) -> None:
            fault = hub.faults.get(sha)
            if fault == "corrupt":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            rng = self.headers.get("Range")
            m = re.match(r"^bytes=(\d+)-$", rng or "")
            if m:
                start = int(m[1])
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if head:
                return
            if fault in ("truncate", "truncate_once", "stall"):
                # Bytes up to the middle of the file, then the connection drops mid-body.
                self.wfile.write(body[: max(0, len(data) // 2 - start)])
                self.wfile.flush()
                if fault == "truncate_once":
                    hub.faults.pop(sha, None)
                if fault == "stall":
                    hub.stalled.set()
                    hub.release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(body)

        # -- upload -----------------------------------------------------------------------
        def _create(self, body: bytes) -> None:
            if not self._authorised():
                return
            payload = json.loads(body)
            repo_id = f"{payload.get('organization')}/{payload['name']}"
            with hub.lock:
                if repo_id in hub.repos:
                    message = "You already created this model repo"
                    return self._json(409, {"error": message, "url": f"{hub.url}/{repo_id}"},
                                      {"X-Error-Message": message})
                hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _preupload(self, repo_id: str, rev: str, body: bytes) -> None:
            if not self._authorised():
                return
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            head = repo.commits.get(repo.branches.get(rev, ""), {})
            files = []
            for f in json.loads(body)["files"]:
                existing = head.get(f["path"])
                files.append({
                    "path": f["path"],
                    "uploadMode": hub.upload_mode,
                    "shouldIgnore": False,
                    "oid": (existing.sha256 if existing.lfs else existing.git_oid)
                    if existing else None,
                })
            self._json(200, {"files": files})

        def _batch(self, repo_id: str, body: bytes) -> None:
            if not self._authorised():
                return
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            payload = json.loads(body)
            objects = []
            for obj in payload["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"],
                                         "authenticated": True}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.cdn_url}/upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify"},
                    }
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects},
                       {"Content-Type": "application/vnd.git-lfs+json"})

        def _verify(self, body: bytes) -> None:
            if not self._authorised():
                return
            payload = json.loads(body)
            with hub.lock:
                data = hub.pending.pop(payload["oid"], None)
                if data is None or len(data) != payload["size"]:
                    return self._error(404, None, "object was not uploaded")
                if hashlib.sha256(data).hexdigest() != payload["oid"]:
                    return self._error(422, None, "uploaded bytes do not match the oid")
                hub.lfs[payload["oid"]] = data
            self._json(200, {"success": True})

        def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
            if not self._authorised():
                return
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            summary = ""
            changes: dict[str, StoredFile] = {}
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary = value["summary"]
                elif item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    changes[value["path"]] = hub._store(data, lfs=False)
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} not uploaded")
                    data = hub.lfs[value["oid"]]
                    changes[value["path"]] = StoredFile(
                        sha256=value["oid"], size=len(data), lfs=True,
                        git_oid=git_blob_oid(data))
                else:
                    return self._error(400, None, f"test hub: unsupported key {item['key']}")
            with hub.lock:
                oid = hub._commit(repo, rev, changes, summary)
            self._json(200, {"success": True, "commitOid": oid,
                             "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}"})

    return Handler
