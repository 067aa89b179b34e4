"""Real Hub code paths against a local HTTP server speaking the part of the Hub API huggingface_hub uses.

The server implements: repo creation, README metadata validation, preupload (every file "regular", so
files travel inline in the commit, no LFS/Xet), the NDJSON commit endpoint, and HEAD/GET ``resolve``
downloads with ``X-Repo-Commit`` / ``ETag`` headers and the Hub's ``X-Error-Code`` errors. A private
repository answers only to the right bearer token. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import CheckpointError, ModelNotFoundError
from visreg_hub.hub import from_pretrained, registry
from visreg_hub.hub.saving import save_pretrained

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_local_test_token"


class FakeHub:
    """In-memory Hub: repos -> branches -> commit sha -> {path: bytes}; records every request."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []

    def add_commit(
        self, repo_id: str, files: dict[str, bytes], branch: str = "main", private: bool = False
    ) -> str:
        repo = self.repos.setdefault(repo_id, {"private": private, "branches": {}, "snapshots": {}})
        parent = repo["branches"].get(branch)
        snapshot = dict(repo["snapshots"].get(parent, {})) if parent else {}
        snapshot.update(files)
        digest = hashlib.sha1(
            repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in snapshot.items())).encode()
        )
        sha = digest.hexdigest()
        repo["snapshots"][sha] = snapshot
        repo["branches"][branch] = sha
        return sha

    def add_folder(self, repo_id: str, folder: Path, **kwargs) -> str:
        return self.add_commit(
            repo_id, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, **kwargs
        )

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                headers = dict(headers or {})
                headers.setdefault("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body and not head:
                    self.wfile.write(body)

            def _json(self, code, obj, headers=None):
                self._reply(
                    code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
                )

            def _authorised(self, repo) -> bool:
                return not repo["private"] or self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def do_HEAD(self):
                self._resolve(head=True)

            def do_GET(self):
                self._resolve(head=False)

            def _resolve(self, head):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._json(404, {"error": "not served by the fake hub"})
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None or not self._authorised(repo):
                    return self._json(
                        401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                    )
                sha = repo["branches"].get(revision) or (revision if revision in repo["snapshots"] else None)
                if sha is None:
                    return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                files = repo["snapshots"][sha]
                if filename not in files:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = files[filename]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                self._reply(200, data, headers, head=head)

            def do_POST(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._json(401, {"error": "Invalid credentials"})
                if path == "/api/repos/create":
                    request = json.loads(body)
                    # huggingface_hub 2.x sends "visibility"; older releases sent "private"
                    private = request.get("visibility") == "private" or bool(request.get("private"))
                    hub.created.append({**request, "private": private})
                    repo_id = f"{request['organization']}/{request['name']}"
                    hub.repos.setdefault(repo_id, {"private": private, "branches": {}, "snapshots": {}})
                    return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    metadata = yaml.safe_load(content.split("---")[1])
                    errors = (
                        [] if isinstance(metadata, dict) and "license" in metadata else [{"message": "bad"}]
                    )
                    return self._json(400 if errors else 200, {"errors": errors, "warnings": []})
                parts = path.strip("/").split("/")  # api models org name <action> <revision>
                repo_id, action = "/".join(parts[2:4]), parts[4]
                if action == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self._json(200, {"files": modes})
                if action == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files = {
                        item["value"]["path"]: base64.b64decode(item["value"]["content"])
                        for item in lines
                        if item["key"] == "file"
                    }
                    lfs = [item for item in lines if item["key"] != "header" and item["key"] != "file"]
                    branch = parts[5]
                    sha = hub.add_commit(repo_id, files, branch=branch)
                    hub.commits.append(
                        {"repo_id": repo_id, "branch": branch, "header": header, "files": files, "other": lfs,
                         "params": parse_qs(url.query)}
                    )  # fmt: skip
                    return self._json(
                        200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha}
                    )
                return self._json(404, {"error": f"fake hub does not serve {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    """A running fake Hub that this process's huggingface_hub talks to (endpoint patched in-process)."""
    from huggingface_hub import constants

    hub = FakeHub().start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.stop()


def _probe_images() -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(7))


def test_push_to_hub_sends_config_weights_and_card(fake_hub):
    model = tiny_encoder(extra={"license": "apache-2.0", "datasets": ["fashion_mnist"]})
    results = [
        {"task": "knn", "dataset": "fashion_mnist", "metric": "accuracy", "value": 71.5, "split": "test"}
    ]
    info = model.push_to_hub(
        "visreg-test/tiny",
        private=True,
        token=TOKEN,
        commit_message="first upload",
        eval_results=results,
        eval_command="visreg-hub eval --model visreg-test/tiny",
    )
    (created,) = fake_hub.created
    assert (created["organization"], created["name"], created["private"]) == ("visreg-test", "tiny", True)
    (commit,) = fake_hub.commits
    assert commit["header"]["summary"] == "first upload"
    assert set(commit["files"]) == {"config.json", "model.safetensors", "README.md"}
    assert commit["other"] == []  # everything inline: no LFS pointers
    assert info.oid == fake_hub.repos["visreg-test/tiny"]["branches"]["main"]
    api_calls = [
        (method, path, auth)
        for method, path, auth in fake_hub.requests
        if path.startswith("/api/repos") or "/commit/" in path
    ]
    assert all(auth == f"Bearer {TOKEN}" for _m, _p, auth in api_calls)

    weights = load_safetensors_bytes(commit["files"]["model.safetensors"])
    expected = model.backbone.state_dict()
    assert weights.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=0)
    card = commit["files"]["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"]  # the Hub id, see hub/card.py
    assert "71.5" in card and "visreg-hub eval --model visreg-test/tiny" in card
    assert 'from_pretrained("visreg-test/tiny")' in card
    assert json.loads(commit["files"]["config.json"])["visreg"]["license"] == "apache-2.0"


def test_push_to_a_branch_creates_it_and_commits_there(fake_hub, monkeypatch):
    from huggingface_hub import HfApi

    branches = []
    monkeypatch.setattr(
        HfApi, "create_branch", lambda self, repo_id, **kw: branches.append((repo_id, kw["branch"]))
    )
    tiny_encoder().push_to_hub("visreg-test/tiny", token=TOKEN, revision="v1")
    assert branches == [("visreg-test/tiny", "v1")]
    assert fake_hub.commits[-1]["branch"] == "v1"


def test_hub_download_round_trip_revision_pinning_and_cache_only(fake_hub, tmp_path):
    first, second = tiny_encoder(seed=1), tiny_encoder(seed=2)
    first_sha = fake_hub.add_folder("org/tiny", save_pretrained(first, tmp_path / "first"))
    fake_hub.add_folder("org/tiny", save_pretrained(second, tmp_path / "second"))
    cache = tmp_path / "cache"
    images = _probe_images()
    with torch.no_grad():
        latest = from_pretrained("org/tiny", cache_dir=cache)
        torch.testing.assert_close(latest(images), second(images), rtol=0, atol=0)
        pinned = from_pretrained("hf-hub:org/tiny", revision=first_sha, cache_dir=cache)
        torch.testing.assert_close(pinned(images), first(images), rtol=0, atol=0)
        for spelled in (f"hf-hub:org/tiny@{first_sha}", f"org/tiny@{first_sha}"):  # timm's pin spelling
            torch.testing.assert_close(from_pretrained(spelled, cache_dir=cache)(images), first(images))
        # both revisions now in the cache: loadable without any request
        requests_before = len(fake_hub.requests)
        cached = from_pretrained("org/tiny", revision=first_sha, cache_dir=cache, local_files_only=True)
        torch.testing.assert_close(cached(images), first(images), rtol=0, atol=0)
        assert len(fake_hub.requests) == requests_before
    assert (cache / "models--org--tiny" / "snapshots" / first_sha / "model.safetensors").exists()
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache") as missing:
        from_pretrained("org/never-downloaded", cache_dir=cache, local_files_only=True)
    # the offline way out is named: every bundled model, each of which loads without the network
    bundled = [entry.name for entry in registry.list_models() if entry.status == "bundled"]
    assert bundled and all(name in str(missing.value) for name in bundled)
    with pytest.raises(ModelNotFoundError, match="not found or is private"):
        from_pretrained("org/missing", cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="revision"):
        from_pretrained("org/tiny", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="but revision='main' was also given"):
        from_pretrained(f"hf-hub:org/tiny@{first_sha}", revision="main", cache_dir=cache)
    with pytest.raises(ModelNotFoundError, match="without a revision"):
        from_pretrained("hf-hub:org/tiny@", cache_dir=cache)


def test_hub_repo_without_safetensors_is_refused(fake_hub, tmp_path):
    folder = save_pretrained(tiny_encoder(), tmp_path / "m")
    fake_hub.add_commit(
        "org/pickled", {"config.json": (folder / "config.json").read_bytes(), "pytorch_model.bin": b"x"}
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained("org/pickled", cache_dir=tmp_path / "cache")


def _official_like_pth(model, path: Path) -> Path:
    """A file shaped like the official release: flat timm keys plus projector keys, pickled by torch.save."""
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    state.update({"proj.0.weight": torch.randn(16, 32), "proj.1.running_mean": torch.zeros(16)})
    torch.save(state, path)
    return path


@pytest.fixture
def official_entry(fake_hub, tmp_path, monkeypatch):
    """A registry entry in the official-pth format, served by the fake hub, with its sha256 pinned."""
    source = tiny_encoder(seed=5)
    pth = _official_like_pth(source, tmp_path / "visreg-tiny.pth")
    sha = fake_hub.add_commit("BooBooWu/visreg", {"visreg-tiny.pth": pth.read_bytes()})
    entry = registry.RegistryEntry(
        name="tiny-official",
        size="vit-t4-28",
        status="published",
        format="official-pth",
        source="test",
        license="cc-by-nc-4.0",
        repo_id="BooBooWu/visreg",
        filename="visreg-tiny.pth",
        revision=sha,
        sha256=hashlib.sha256(pth.read_bytes()).hexdigest(),
        config_overrides=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    )
    monkeypatch.setattr(registry, "_ENTRIES", (*registry._ENTRIES, entry))
    return entry, source


def test_official_registry_entry_downloads_converts_and_checks_sha256(official_entry, tmp_path, monkeypatch):
    entry, source = official_entry
    model = from_pretrained("tiny-official", cache_dir=tmp_path / "cache")
    images = _probe_images()
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), source.forward_features(images), rtol=0, atol=0
        )
    assert model.config.extra["license"] == "cc-by-nc-4.0"

    bad = registry.RegistryEntry(**{**entry.__dict__, "name": "tiny-official-bad", "sha256": "0" * 64})
    monkeypatch.setattr(registry, "_ENTRIES", (*registry._ENTRIES, bad))
    with pytest.raises(CheckpointError, match="SHA-256"):
        from_pretrained("tiny-official-bad", cache_dir=tmp_path / "cache")


def test_hf_token_private_download_then_offline_reload_from_hf_home(fake_hub, tmp_path, monkeypatch):
    """HF_TOKEN is read per request; HF_HOME / HF_HUB_OFFLINE at import, hence a fresh offline process."""
    model = tiny_encoder(seed=9)
    fake_hub.add_folder("org/private-tiny", save_pretrained(model, tmp_path / "m"), private=True)
    hub_cache = tmp_path / "hf_home" / "hub"  # where huggingface_hub puts the cache for HF_HOME=tmp/hf_home
    images = _probe_images()
    with pytest.raises(ModelNotFoundError, match="private"):
        from_pretrained("org/private-tiny", cache_dir=hub_cache)  # no token: the Hub hides the repo
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(from_pretrained("org/private-tiny", cache_dir=hub_cache)(images), expected)
    assert any(auth == f"Bearer {TOKEN}" for _m, path, auth in fake_hub.requests if "private-tiny" in path)
    fake_hub.stop()  # from here on nothing answers: only the cache can serve the model

    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys, numpy, torch, visreg_hub\n"
        "from visreg_hub.errors import ModelNotFoundError\n"
        "m = visreg_hub.from_pretrained('org/private-tiny')\n"
        "x = torch.from_numpy(numpy.load(sys.argv[1]))\n"
        "numpy.save(sys.argv[2], m(x).detach().numpy())\n"
        "try:\n"
        "    visreg_hub.from_pretrained('org/other')\n"
        "except ModelNotFoundError as e:\n"
        "    print('OTHER-FAILED', type(e).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT=fake_hub.url,  # stopped server: any request would fail
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    offline = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images.npy"), str(tmp_path / "offline.npy")],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "OTHER-FAILED ModelNotFoundError" in offline.stdout
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "offline.npy")), expected, rtol=0, atol=0)


def test_push_to_hub_failures_are_one_line_naming_the_fix(monkeypatch, tmp_path):
    """Offline, model.push_to_hub() raised httpx's bare "ConnectError: Name or service not known", not
    saying what it contacted or what to do (probe 15); the trainer's --push_to_hub check already did."""
    import socket

    from huggingface_hub import constants

    from visreg_hub.errors import HubRequestError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubRequestError, match=r"push_to_hub me/x needs the Hugging Face Hub but HF_HUB_OFF"):
        tiny_encoder().push_to_hub("me/x", token=TOKEN)
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubRequestError, match=rf"127\.0\.0\.1:{port} is unreachable .*upload the folder"):
        tiny_encoder().push_to_hub("me/x", token=TOKEN)


@pytest.mark.parametrize(
    ("status", "said", "advice"),
    [(401, None, r"token is missing.*\); set HF_TOKEN to a token with write access"),
     (403, "You don't have the rights to create a model under the namespace x",
      r"You don't have the rights.*; the token is missing.*\); set HF_TOKEN"),
     (404, None, "no such repository"), (429, None, "wait a minute"),
     (503, None, r"the Hub failed\); try again later"),
     (409, "You already created this model repo", r"You already created this model repo\); fix what"),
     (413, None, r"no reason given\); check the repository name and the token")],
)  # fmt: skip
def test_a_hub_refusal_names_its_own_fix(monkeypatch, status, said, advice):
    """Every HTTP refusal was reported as a token problem, a 503 or a 429 too (review 16); the Hub's own
    explanation is kept, and httpx's boilerplate never stands in for it (review 18)."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from visreg_hub.errors import HubRequestError
    from visreg_hub.hub.remote import hub_request

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    answer = httpx.Response(status, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))

    def refused():
        raise HfHubHTTPError(f"Client error '{status}' for url 'https://x' see developer.mozilla.org",
                             response=answer, server_message=said)  # fmt: skip

    with pytest.raises(HubRequestError, match=rf"HTTP {status}: .*{advice}.*, or upload later$") as info:
        hub_request("push_to_hub me/x", refused, fix="or upload later")
    assert "mozilla" not in str(info.value)
    assert status in (401, 403) or "write access" not in str(info.value)


def test_push_refuses_malformed_repo_ids_before_any_request(monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("a request was made"))
    for repo in ("me/ x", " me/x", "me/x?"):
        with pytest.raises(ValueError, match="not a valid Hub repository id"):
            tiny_encoder().push_to_hub(repo)


def test_a_hub_url_names_the_repo_id_to_pass():
    with pytest.raises(ModelNotFoundError, match="pass 'me/mini'"):
        from_pretrained("https://huggingface.co/me/mini")
