"""A small Hub-compatible HTTP server on 127.0.0.1 for round-trip tests.

It speaks the plain-HTTP subset of the Hugging Face Hub API that huggingface_hub's
client uses for models: create a repo, validate README metadata, preupload (every file "regular"), commit as
NDJSON with base64 contents, repo info, tree listing, and file resolve (HEAD/GET).
Commits are kept in memory with content-addressed ids, so revisions work. The real
client code runs unchanged against it through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
        self.lock = threading.Lock()

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            empty = hashlib.sha1(repo_id.encode()).hexdigest()
            self.repos[repo_id] = {"branches": {"main": empty}, "commits": {empty: {}}}
            return True

    def files(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo["branches"].get(revision, revision)
        tree = repo["commits"].get(sha)
        return None if tree is None else (sha, tree)

    def commit(self, repo_id: str, branch: str, added: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo["branches"].setdefault(branch, repo["branches"]["main"])
            tree = dict(repo["commits"][parent])
            tree.update(added)
            for path in deleted:
                tree.pop(path, None)
            digest = hashlib.sha1(parent.encode())
            for path in sorted(tree):
                digest.update(path.encode() + hashlib.sha256(tree[path]).digest())
            sha = digest.hexdigest()
            repo["commits"][sha] = tree
            repo["branches"][branch] = sha
            return sha


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    endpoint: str

    def log_message(self, *args):  # keep test output clean
        pass

    # -- plumbing -------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, head: bool = False):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status: int, message: str, head: bool = False):
        self._send(status, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Message": message}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    # -- routes ---------------------------------------------------------------------
    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/repos/create":
            request = json.loads(self._body())
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            created = self.state.create(repo_id)
            return self._json(200 if created else 409, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":  # the README's metadata block must be a YAML mapping
            content = json.loads(self._body())["content"]
            try:
                valid = isinstance(yaml.safe_load(content.split("---")[1]), dict)
            except (yaml.YAMLError, IndexError):
                valid = False
            return self._json(200 if valid else 400, {"errors": [] if valid else [{"message": "invalid metadata"}],
                                                      "warnings": []})
        if match := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>.+)", path):
            files = json.loads(self._body())["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if match := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>.+)", path):
            repo_id, branch = match["repo"], match["rev"]
            if repo_id not in self.state.repos:
                return self._error(404, f"Repository {repo_id} not found")
            added, deleted = {}, []
            for line in self._body().decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    deleted.append(item["value"]["path"])
                elif item["key"] == "lfsFile":
                    return self._error(400, "this test hub accepts regular uploads only")
            sha = self.state.commit(repo_id, branch, added, deleted)
            return self._json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})
        return self._error(404, f"no route for POST {path}")

    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", path):
            found = self.state.files(match["repo"], match["rev"] or "main")
            if found is None:
                return self._error(404, "Repository or revision not found", head)
            sha, tree = found
            return self._json(200, {"id": match["repo"], "modelId": match["repo"], "sha": sha, "private": False,
                                    "siblings": [{"rfilename": name} for name in sorted(tree)]}, head)
        if match := re.fullmatch(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path):
            found = self.state.files(match["repo"], match["rev"])
            if found is None:
                return self._error(404, "Repository or revision not found", head)
            _, tree = found
            prefix = (match["sub"] or "").strip("/")
            entries = [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                       for name, data in sorted(tree.items()) if not prefix or name.startswith(prefix + "/")]
            return self._json(200, entries, head)
        if match := re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            found = self.state.files(match["repo"], match["rev"])
            if found is None or match["file"] not in found[1]:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            sha, tree = found
            content = tree[match["file"]]
            return self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(content)}"',
                                             "Content-Type": "application/octet-stream"}, head)
        return self._error(404, f"no route for GET {path}", head)


class HubServer:
    """Run the test hub in a background thread: ``with HubServer() as hub: hub.endpoint``."""

    def __init__(self):
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.endpoint = self.endpoint
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
