"""A small Hub-compatible HTTP server on 127.0.0.1 for round-trip tests.

It speaks the plain-HTTP subset of the Hugging Face Hub API that huggingface_hub's
client uses for models: create a repo or a branch, validate README metadata, preupload,
commit as NDJSON, repo info, tree listing, and file resolve (HEAD/GET). Commits are kept
in memory with content-addressed ids, so revisions work.

Large and binary files take the git-LFS path, as on the real Hub: preupload answers
``"uploadMode": "lfs"`` for them, the client asks ``{repo}.git/info/lfs/objects/batch``
(the git-lfs batch API) where to put each object, PUTs it to the returned href on a
separate "storage" origin, calls the verify action, and the commit names the object by
sha256 and size (``lfsFile`` lines). Resolving an LFS file answers with a redirect to the
storage origin carrying ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, which the
client follows without its token. :class:`HubState` counts what went through LFS.

The real client code runs unchanged against it through ``HF_ENDPOINT`` (with
``HF_HUB_DISABLE_XET=1``: the Xet storage protocol is not served here).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

# The suffixes the Hub's default .gitattributes sends to LFS (the ones xbt and its tests meet).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".npy", ".onnx", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True)
class Blob:
    """A file of a commit: its bytes, and whether it is stored as an LFS object."""

    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def pointer(self) -> bytes:
        """The git-lfs pointer file git stores in place of an LFS object."""
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def git_oid(self) -> str:
        """The git blob id (of the pointer, for an LFS file), as the Hub reports it."""
        stored = self.pointer() if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule: LFS-tracked suffixes, large files and binary content go through LFS."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


class HubState:
    """Repos (branches -> commit ids -> trees of :class:`Blob`), the LFS store and its counters."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: sha}, "commits": {sha: {path: Blob}}}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, filled by PUTs to the storage origin
        self.lfs_uploads: list[str] = []  # sha256 of every object PUT
        self.lfs_downloads: list[str] = []  # sha256 of every object served from storage
        self.lock = threading.Lock()

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            empty = hashlib.sha1(repo_id.encode()).hexdigest()
            self.repos[repo_id] = {"branches": {"main": empty}, "commits": {empty: {}}}
            return True

    def files(self, repo_id: str, revision: str) -> tuple[str, dict[str, Blob]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo["branches"].get(revision, revision)
        tree = repo["commits"].get(sha)
        return None if tree is None else (sha, tree)

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, Blob]:
        """The files of ``repo_id`` at a branch or commit (raises KeyError when unknown)."""
        found = self.files(repo_id, revision)
        if found is None:
            raise KeyError(f"{repo_id}@{revision}")
        return found[1]

    def commit(self, repo_id: str, branch: str, added: dict[str, Blob], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo["branches"].setdefault(branch, repo["branches"]["main"])
            tree = dict(repo["commits"][parent])
            tree.update(added)
            for path in deleted:
                tree.pop(path, None)
            digest = hashlib.sha1(parent.encode())
            for path in sorted(tree):
                digest.update(path.encode() + bytes.fromhex(tree[path].sha256))
            sha = digest.hexdigest()
            repo["commits"][sha] = tree
            repo["branches"][branch] = sha
            return sha

    def seed(self, repo_id: str, folder: str | Path) -> str:
        """Publish every file of ``folder`` as ``repo_id`` (server side, for fixtures); returns the commit."""
        self.create(repo_id)
        folder = Path(folder)
        added = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            name = path.relative_to(folder).as_posix()
            added[name] = Blob(data, lfs=wants_lfs(name, len(data), data[:512]))
            if added[name].lfs:
                self.lfs_objects[added[name].sha256] = data
        return self.commit(repo_id, "main", added, [])


REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    endpoint: str
    storage: str  # origin of the LFS storage (the Hub's S3/CDN): another port, so the client drops its token
    writable: tuple[str, ...] | None  # the namespaces the token may create repos in (None: all)

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
            namespace = request.get("organization") or "user"
            repo_id = f"{namespace}/{request['name']}"
            if self.writable is not None and namespace not in self.writable:
                return self._error(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
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
        if match := re.fullmatch(rf"/api/models/{REPO}/branch/(?P<branch>.+)", path):
            return self._create_branch(match["repo"], match["branch"])
        if match := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>.+)", path):
            files = json.loads(self._body())["files"]
            modes = [{"path": f["path"], "shouldIgnore": False,
                      "uploadMode": "lfs" if wants_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                      else "regular"} for f in files]
            return self._json(200, {"files": modes})
        if match := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(match["repo"], json.loads(self._body()))
        if re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/verify", path):
            request = json.loads(self._body())
            stored = self.state.lfs_objects.get(request["oid"])
            if stored is None or len(stored) != request["size"]:
                return self._error(404, f"LFS object {request['oid']} was not uploaded")
            return self._json(200, {"success": True})
        if match := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>.+)", path):
            return self._commit(match["repo"], match["rev"])
        return self._error(404, f"no route for POST {path}")

    def do_PUT(self):  # the storage origin: an LFS object at the href the batch API handed out
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", path):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != match["oid"]:
                return self._error(400, "content does not match its sha256")
            with self.state.lock:
                self.state.lfs_objects[match["oid"]] = data
                self.state.lfs_uploads.append(match["oid"])
            return self._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        return self._error(404, f"no route for PUT {path}")

    def _create_branch(self, repo_id: str, branch: str):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, f"Repository {repo_id} not found")
        if branch in repo["branches"]:
            return self._error(409, f"Branch {branch} already exists")
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        with self.state.lock:
            repo["branches"][branch] = repo["branches"].get(start, start)
        return self._json(200, {})

    def _lfs_batch(self, repo_id: str, request: dict):
        """git-lfs batch API: an upload action for each object the store lacks, none for the others."""
        if repo_id not in self.state.repos:
            return self._error(404, f"Repository {repo_id} not found")
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.state.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.storage}/lfs/{item['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        return self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id: str, branch: str):
        if repo_id not in self.state.repos:
            return self._error(404, f"Repository {repo_id} not found")
        added, deleted = {}, []
        for line in self._body().decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                added[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif item["key"] == "lfsFile":  # the object must already be in the store, with that size
                stored = self.state.lfs_objects.get(value["oid"])
                if stored is None or len(stored) != value["size"]:
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                added[value["path"]] = Blob(stored, lfs=True)
            elif item["key"] == "deletedFile":
                deleted.append(value["path"])
        sha = self.state.commit(repo_id, branch, added, deleted)
        return self._json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", path):
            data = self.state.lfs_objects.get(match["oid"])
            if data is None:
                return self._send(404, b"", head=head)
            if not head:
                self.state.lfs_downloads.append(match["oid"])
            return self._send(200, data, {"Content-Type": "application/octet-stream"}, head)
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
            prefix = (match["sub"] or "").strip("/")
            entries = [_tree_entry(name, blob) for name, blob in sorted(found[1].items())
                       if not prefix or name.startswith(prefix + "/")]
            return self._json(200, entries, head)
        if match := re.fullmatch(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            return self._resolve(match["repo"], match["rev"], match["file"], head)
        return self._error(404, f"no route for GET {path}", head)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
        """A regular file is served here; an LFS file redirects to the storage origin, as on the Hub."""
        found = self.state.files(repo_id, revision)
        if found is None or name not in found[1]:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
        sha, tree = found
        blob = tree[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.git_oid}"'}
        if blob.lfs:
            headers.update({"Location": f"{self.storage}/lfs/{blob.sha256}", "X-Linked-Etag": f'"{blob.sha256}"',
                            "X-Linked-Size": str(len(blob.data))})
            return self._send(302, b"", headers, head)
        return self._send(200, blob.data, {**headers, "Content-Type": "application/octet-stream"}, head)


def _tree_entry(name: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": name, "size": len(blob.data), "oid": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer())}
    return entry


class HubServer:
    """Run the test hub (and its LFS storage origin) in background threads: ``with HubServer() as hub: ...``.

    ``writable`` lists the namespaces where repos may be created (default: any), as a
    token's rights do on the Hub.
    """

    def __init__(self, writable: tuple[str, ...] | None = None):
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state, "writable": writable})
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in ("hub", "storage")]
        self.endpoint, handler.storage = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        handler.endpoint = self.endpoint
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]

    def __enter__(self) -> HubServer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()
            server.server_close()
