"""A stand-in for the Hugging Face hub and for ModelScope on 127.0.0.1, serving repos from local files.
Tests point HF_ENDPOINT or MODELSCOPE_ENDPOINT at it, so downloads run the real client code (the
`huggingface_hub` or `modelscope` package) without touching the network.

Hugging Face: repo info, file tree, resolve with HEAD and GET. ModelScope (what modelscope 1.40's
`HubApi.get_model_files` and `snapshot_download` call): the file listing
/api/v1/models/OWNER/NAME/repo/files?Revision=R&Recursive=True (with Sha256s, which the client checks)
and the file bytes /api/v1/models/OWNER/NAME/repo?Revision=R&FilePath=F. ModelScope's default branch
is master: it serves the repo's main.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class FakeRepo:
    revisions: dict[str, dict[str, Path]]  # branch or tag -> {file name in the repo: local file}
    shas: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for rev in self.revisions:
            self.shas[rev] = hashlib.sha1(rev.encode()).hexdigest()

    def files(self, rev: str) -> dict[str, Path] | None:
        for name, sha in self.shas.items():
            if rev in (name, sha):
                return self.revisions[name]
        return None

    def sha(self, rev: str) -> str:
        return self.shas.get(rev, rev)


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ms_listing(files: dict[str, Path]) -> list[dict]:
    """ModelScope's repo/files entries: every file, and every directory as a "tree" entry."""
    dirs = sorted({f.rsplit("/", i)[0] for f in files for i in range(1, f.count("/") + 1)})
    return [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0} for d in dirs] + [
        {"Name": f.rsplit("/", 1)[-1], "Path": f, "Type": "blob", "Size": p.stat().st_size, "Sha256": _sha256(p)}
        for f, p in files.items()
    ]


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_MS_REPO = re.compile(r"^/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo(?P<listing>/files)?$")


def serve(repos: dict[str, FakeRepo]) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a thread; returns it (call .shutdown()) and its endpoint URL."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, content_type: str, status: int = 200, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value, status: int = 200, headers: dict[str, str] | None = None):
            self._send(json.dumps(value).encode(), "application/json", status, headers)

        def _error(self, code: str, status: int = 404):
            self._json({"error": code}, status, {"X-Error-Code": code})

        def _ms_error(self, code: str, status: int = 404):  # ModelScope's envelope
            self._json({"Code": status, "Success": False, "Message": code}, status)

        def _lookup(self, repo_id: str, rev: str) -> tuple[FakeRepo | None, dict[str, Path] | None, str | None]:
            """(repo, its files at `rev`, None), or the error code of what is missing."""
            repo = repos.get(repo_id)
            if repo is None:
                return None, None, "RepoNotFound"
            files = repo.files(rev)
            return repo, files, (None if files is not None else "RevisionNotFound")

        def do_GET(self):
            self._handle()

        def do_HEAD(self):
            self._handle()

        def _handle(self):
            url = urlparse(self.path)
            path, query = url.path, {k: v[0] for k, v in parse_qs(url.query).items()}
            requests.append(f"{self.command} {self.path}")
            if m := _MS_REPO.match(path):
                rev = query.get("Revision", "master")
                repo, files, missing = self._lookup(unquote(m["repo"]), "main" if rev == "master" else rev)
                if missing:
                    return self._ms_error(missing)
                if m["listing"]:
                    root = query.get("Root", "").strip("/")
                    entries = [e for e in _ms_listing(files) if not root or e["Path"].startswith(root + "/")]
                    return self._json({"Code": 200, "Success": True, "Data": {"Files": entries}})
                local = files.get(query.get("FilePath", ""))
                if local is None:
                    return self._ms_error("FileNotFound")
                return self._send(local.read_bytes(), "application/octet-stream")
            if m := _API.match(path):
                repo, files, missing = self._lookup(unquote(m["repo"]), unquote(m["rev"]))
                if missing:
                    return self._error(missing)
                sha = repo.sha(unquote(m["rev"]))
                if m["kind"] == "revision":
                    return self._json({"id": m["repo"], "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                return self._json([
                    {"type": "file", "path": f, "size": p.stat().st_size, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f, p in files.items()
                ])
            if m := _RESOLVE.match(path):
                repo, files, missing = self._lookup(unquote(m["repo"]), unquote(m["rev"]))
                if missing:
                    return self._error(missing)
                local = files.get(unquote(m["file"]))
                if local is None:
                    return self._error("EntryNotFound")
                headers = {"X-Repo-Commit": repo.sha(unquote(m["rev"])), "ETag": f'"{_sha256(local)}"'}
                return self._send(local.read_bytes(), "application/octet-stream", headers=headers)
            self._error("NotFound")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = requests  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
