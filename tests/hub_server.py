"""A local stand-in for the Hugging Face Hub's HTTP API, for the push tests: the parts huggingface_hub's
HfApi uses for whoami, create_repo, create_branch and create_commit (preupload, validate-yaml, the
NDJSON commit with inline base64 files, and the LFS batch API with a basic PUT upload).

Files whose name ends with one of `lfs_suffixes` are answered `uploadMode: lfs` (the client then uploads
them through the LFS batch endpoint; with hf_xet installed that needs HF_HUB_DISABLE_XET), the rest
`regular`. Every request is recorded (method, path, headers, body) for the tests to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class HubServer:
    def __init__(
        self,
        token: str,
        user: str = "tester",
        role: str = "write",
        lfs_suffixes=(".safetensors",),
        fail_commits: bool = False,
    ):
        self.token, self.user, self.role, self.lfs_suffixes = token, user, role, tuple(lfs_suffixes)
        self.fail_commits = fail_commits
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> content
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.create_payloads: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    # --- the API ------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, object]:
        path = path.split("?")[0]
        if method == "PUT" and path.startswith("/lfs-upload/"):
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[oid] = body
            return 200, {}
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {
                "type": "user",
                "name": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}},
            }
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(json.loads(body))
        parts = path.split("/")  # /api/models/{ns}/{name}/{action}/{revision}
        if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}
            return self._repo_action(method, repo_id, action, rev, body)
        return 404, {"error": f"not implemented here: {method} {path}"}

    def _create(self, payload: dict) -> tuple[int, object]:
        self.create_payloads.append(payload)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        visibility = payload.get("visibility")
        self.repos[repo_id] = Repo(private=None if visibility is None else visibility == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _lfs_batch(self, payload: dict) -> tuple[int, object]:
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
            }
            for o in payload["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def _repo_action(
        self, method: str, repo_id: str, action: str, rev: str, body: bytes
    ) -> tuple[int, object]:
        repo = self.repos[repo_id]
        if action == "branch" and method == "POST":
            if rev in repo.branches:
                return 409, {"error": "Reference already exists"}
            repo.branches[rev] = dict(repo.branches["main"])
            return 200, {}
        if rev not in repo.branches:
            return 404, {"error": f"Revision not found: {rev}"}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {
                        "path": f["path"],
                        "shouldIgnore": False,
                        "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular",
                    }
                    for f in files
                ]
            }
        if action == "commit":
            if self.fail_commits:
                return 500, {"error": "Internal Error - the test server refuses commits"}
            return self._commit(repo, repo_id, rev, body)
        return 404, {"error": f"not implemented here: {action}"}

    def _commit(self, repo: Repo, repo_id: str, rev: str, body: bytes) -> tuple[int, object]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        tree = repo.branches[rev]
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                tree[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object of {value['path']} was never uploaded"}
                tree[value["path"]] = self.lfs[value["oid"]]
        repo.commits.append({"header": lines[0]["value"], "paths": [i["value"]["path"] for i in lines[1:]]})
        oid = hashlib.sha1(str(len(repo.commits)).encode()).hexdigest()
        return 200, {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = (
                    self._chunked()
                    if self.headers.get("Transfer-Encoding") == "chunked"
                    else self.rfile.read(int(self.headers.get("Content-Length") or 0))
                )
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append((self.command, self.path, headers, body))
                status, payload = server.handle(self.command, self.path, headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunked(self) -> bytes:  # a streamed upload
                out = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler
