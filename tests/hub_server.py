"""A stand-in for the Hugging Face hub on 127.0.0.1: the file API `huggingface_hub` speaks
(repo info, file tree, resolve with HEAD and GET), serving repos from local files. Tests point
HF_ENDPOINT at it, so downloads run the real client code without touching the network.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


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


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def serve(repos: dict[str, FakeRepo]) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a thread; returns it (call .shutdown()) and its endpoint URL."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _error(self, code: str, status: int = 404):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            body = json.dumps({"error": code}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value):
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _lookup(self, repo_id: str, rev: str):
            repo = repos.get(repo_id)
            if repo is None:
                self._error("RepoNotFound")
                return None, None
            files = repo.files(unquote(rev))
            if files is None:
                self._error("RevisionNotFound")
                return None, None
            return repo, files

        def do_GET(self):
            self._handle()

        def do_HEAD(self):
            self._handle()

        def _handle(self):
            path = urlparse(self.path).path
            requests.append(f"{self.command} {path}")
            if m := _API.match(path):
                repo, files = self._lookup(unquote(m["repo"]), m["rev"])
                if repo is None:
                    return
                sha = repo.sha(unquote(m["rev"]))
                if m["kind"] == "revision":
                    return self._json({"id": m["repo"], "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                return self._json([
                    {"type": "file", "path": f, "size": p.stat().st_size, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f, p in files.items()
                ])
            if m := _RESOLVE.match(path):
                repo, files = self._lookup(unquote(m["repo"]), m["rev"])
                if repo is None:
                    return
                local = files.get(unquote(m["file"]))
                if local is None:
                    return self._error("EntryNotFound")
                data = local.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.sha(unquote(m["rev"])))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)
                return
            self._error("NotFound")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = requests  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
