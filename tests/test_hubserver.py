"""The loopback Hub in ``hubserver.py`` must satisfy the real ``huggingface_hub`` client, over real HTTP."""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import HubServer, is_lfs_path

WEIGHTS = os.urandom(1_200_000)  # > 1 MB and *.safetensors: goes through the LFS protocol
CONFIG = json.dumps({"model_type": "vit", "hidden_size": 32, "num_labels": 3})


def _seed(hub: HubServer, repo_id: str = "alice/tiny", **kwargs: object) -> str:
    files = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "docs/notes.txt": "notes"}
    return hub.add_repo(repo_id, files, **kwargs)  # type: ignore[arg-type]


def _status(err: pytest.ExceptionInfo[HfHubHTTPError]) -> int:
    return err.value.response.status_code


# ----- downloads ----------------------------------------------------------------------------------------------


def test_hf_hub_download_and_snapshot_download(hub_server: HubServer, tmp_path: Path) -> None:
    sha = _seed(hub_server)
    cache = tmp_path / "cache"

    kwargs = {"cache_dir": cache, "endpoint": hub_server.endpoint, "token": False}
    weights = hf_hub_download("alice/tiny", "model.safetensors", **kwargs)
    assert Path(weights).read_bytes() == WEIGHTS
    assert sha in weights  # the snapshot folder is named after X-Repo-Commit
    blob_names = {p.name for p in (cache / "models--alice--tiny" / "blobs").iterdir()}
    assert hashlib.sha256(WEIGHTS).hexdigest() in blob_names  # LFS ETag is the sha256

    folder = Path(snapshot_download("alice/tiny", **kwargs))
    assert folder.name == sha
    assert (folder / "config.json").read_text() == CONFIG
    assert (folder / "docs" / "notes.txt").read_text() == "notes"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS


def test_range_requests_are_honoured(hub_server: HubServer) -> None:
    _seed(hub_server)
    url = f"{hub_server.endpoint}/alice/tiny/resolve/main/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
        assert response.read() == WEIGHTS[10:20]


def test_model_info_at_branch_tag_sha_and_pr(hub_server: HubServer, tmp_path: Path) -> None:
    first = _seed(hub_server)
    hub_server.create_tag("alice/tiny", "v1")
    second = hub_server.commit("alice/tiny", {"extra.txt": "more"})
    hub_server.create_branch("alice/tiny", "dev", revision=first)
    api = hub_server.api(hub_server.tokens.write)
    pr = api.create_commit(
        "alice/tiny",
        [CommitOperationAdd("pr.txt", b"proposal")],
        commit_message="Propose",
        create_pr=True,
    )

    assert api.model_info("alice/tiny").sha == second
    assert api.model_info("alice/tiny", revision="main").sha == second
    assert api.model_info("alice/tiny", revision="v1").sha == first
    assert api.model_info("alice/tiny", revision="dev").sha == first
    assert api.model_info("alice/tiny", revision=first).sha == first
    info = api.model_info("alice/tiny", revision="refs/pr/1")
    assert info.sha == pr.oid
    assert {s.rfilename for s in info.siblings} >= {"pr.txt", "extra.txt"}
    assert "extra.txt" not in api.list_repo_files("alice/tiny", revision="v1")

    path = hf_hub_download(
        "alice/tiny", "pr.txt", revision="refs/pr/1", cache_dir=tmp_path, endpoint=hub_server.endpoint, token=False
    )
    assert Path(path).read_bytes() == b"proposal"


def test_model_info_fields_and_tree(hub_server: HubServer) -> None:
    _seed(
        hub_server,
        card_data={"license": "apache-2.0", "tags": ["backdoor-scan"], "datasets": ["cifar10"]},
        readme="# Tiny\n",
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["vision"],
    )
    api = hub_server.api(False)
    info = api.model_info("alice/tiny", files_metadata=True)
    assert info.author == "alice" and info.private is False and info.gated is False
    assert info.library_name == "timm" and info.pipeline_tag == "image-classification"
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert {"vision", "backdoor-scan", "timm", "license:apache-2.0", "dataset:cifar10"} <= set(info.tags)
    assert info.last_modified is not None
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["config.json"].size == len(CONFIG)

    top = {e.path: type(e).__name__ for e in api.list_repo_tree("alice/tiny")}
    assert top == {
        "docs": "RepoFolder",
        "README.md": "RepoFile",
        "config.json": "RepoFile",
        "model.safetensors": "RepoFile",
    }
    assert [e.path for e in api.list_repo_tree("alice/tiny", path_in_repo="docs")] == ["docs/notes.txt"]
    assert "docs/notes.txt" in api.list_repo_files("alice/tiny")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("alice/tiny", path_in_repo="missing"))


def test_list_models_by_author_search_and_filter(hub_server: HubServer) -> None:
    hub_server.add_repo("alice/vit-cifar", {"a": "1"}, tags=["image-classification"], library_name="transformers")
    hub_server.add_repo("alice/resnet-cifar", {"a": "1"}, tags=["image-classification"], library_name="timm")
    hub_server.add_repo("bob/vit-imagenet", {"a": "1"}, library_name="transformers")
    hub_server.add_repo("alice/secret", {"a": "1"}, private=True)
    anonymous, alice = hub_server.api(False), hub_server.api(hub_server.tokens.write)

    def ids(api: object, **kwargs: object) -> set[str]:
        return {m.id for m in api.list_models(**kwargs)}  # type: ignore[attr-defined]

    assert ids(anonymous, author="alice") == {"alice/vit-cifar", "alice/resnet-cifar"}
    assert ids(alice, author="alice") == {"alice/vit-cifar", "alice/resnet-cifar", "alice/secret"}
    assert ids(anonymous, search="vit") == {"alice/vit-cifar", "bob/vit-imagenet"}
    assert ids(anonymous, filter="transformers") == {"alice/vit-cifar", "bob/vit-imagenet"}
    assert ids(anonymous, filter=["transformers", "image-classification"]) == {"alice/vit-cifar"}
    assert len(list(anonymous.list_models(limit=2))) == 2
    full = next(iter(anonymous.list_models(author="bob", full=True)))
    assert full.sha == hub_server.head("bob/vit-imagenet") and [s.rfilename for s in full.siblings] == ["a"]


# ----- writes -------------------------------------------------------------------------------------------------


def test_create_repo_and_exist_ok(hub_server: HubServer) -> None:
    api = hub_server.api(hub_server.tokens.write)
    url = api.create_repo("fresh")
    assert url.repo_id == "alice/fresh" and url.startswith(hub_server.endpoint)
    assert api.create_repo("alice/fresh", exist_ok=True).repo_id == "alice/fresh"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/fresh")
    assert _status(err) == 409
    assert hub_server.files("alice/fresh").keys() == {".gitattributes"}

    api.create_repo("hidden", private=True)
    assert hub_server.repo("alice/hidden").private
    with pytest.raises(RepositoryNotFoundError):
        hub_server.api(False).model_info("alice/hidden")


def test_upload_folder_round_trip_uses_lfs(hub_server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(WEIGHTS)
    (src / "config.json").write_text(CONFIG)
    (src / "sub" / "labels.txt").write_text("cat\ndog\n")
    api = hub_server.api(hub_server.tokens.write)
    api.create_repo("alice/uploaded")

    info = api.upload_folder(repo_id="alice/uploaded", folder_path=src, commit_message="Add model")
    assert info.oid == hub_server.head("alice/uploaded")
    assert hub_server.commits("alice/uploaded")[0].title == "Add model"

    puts = [r for r in hub_server.requests if r.method == "PUT"]
    assert len(puts) == 1 and puts[0].status == 200
    assert not puts[0].sent_authorization  # the LFS upload URL is treated as presigned
    assert hub_server.repo("alice/uploaded").commits[info.oid].files["model.safetensors"].lfs

    folder = Path(
        snapshot_download("alice/uploaded", cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint, token=False)
    )
    for path in ("model.safetensors", "config.json", "sub/labels.txt"):
        assert (folder / path).read_bytes() == (src / path).read_bytes()


def test_reupload_of_identical_content_makes_no_commit_or_pr(hub_server: HubServer) -> None:
    _seed(hub_server)
    api = hub_server.api(hub_server.tokens.write)
    before = hub_server.head("alice/tiny")
    ops = lambda: [  # noqa: E731 - operations cannot be reused after a commit attempt
        CommitOperationAdd("config.json", CONFIG.encode()),
        CommitOperationAdd("model.safetensors", WEIGHTS),
    ]
    assert api.create_commit("alice/tiny", ops(), commit_message="same").oid == before
    assert api.create_commit("alice/tiny", ops(), commit_message="same", create_pr=True).pr_url is None
    assert hub_server.head("alice/tiny") == before and len(hub_server.commits("alice/tiny")) == 1
    assert hub_server.discussions("alice/tiny") == []


def test_create_pr_opens_refs_pr_and_discussion(hub_server: HubServer) -> None:
    base = _seed(hub_server)
    bob = hub_server.api(hub_server.tokens.other)  # may open a PR on alice's public repo, not push to main
    info = bob.create_commit(
        "alice/tiny",
        [CommitOperationAdd("model.safetensors", b"repaired" * 200_000)],
        commit_message="Repair backdoor",
        commit_description="OTBR repair",
        create_pr=True,
    )
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub_server.head("alice/tiny") == base
    assert hub_server.refs("alice/tiny")["refs/pr/1"] == info.oid
    assert hub_server.commits("alice/tiny", "refs/pr/1")[1].sha == base
    assert hub_server.files("alice/tiny", "refs/pr/1")["model.safetensors"] == b"repaired" * 200_000

    discussions = list(bob.get_repo_discussions("alice/tiny"))
    assert [(d.num, d.title, d.is_pull_request, d.author) for d in discussions] == [(1, "Repair backdoor", True, "bob")]
    details = bob.get_discussion_details("alice/tiny", 1)
    assert details.target_branch == "refs/heads/main" and details.git_reference == "refs/pr/1"
    assert details.events[0].content == "OTBR repair"

    with pytest.raises(HfHubHTTPError) as err:
        bob.create_commit("alice/tiny", [CommitOperationAdd("x.txt", b"x")], commit_message="direct push")
    assert _status(err) == 403


def test_parent_commit_mismatch_is_rejected(hub_server: HubServer) -> None:
    old = _seed(hub_server)
    hub_server.commit("alice/tiny", {"moved.txt": "on"})
    api = hub_server.api(hub_server.tokens.write)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("alice/tiny", [CommitOperationAdd("x.txt", b"x")], commit_message="m", parent_commit=old)
    assert _status(err) == 412
    head = hub_server.head("alice/tiny")
    done = api.create_commit("alice/tiny", [CommitOperationAdd("x.txt", b"x")], commit_message="m", parent_commit=head)
    assert hub_server.commits("alice/tiny")[1].sha == head and done.oid == hub_server.head("alice/tiny")


def test_branches_tags_refs_and_commits_api(hub_server: HubServer) -> None:
    first = _seed(hub_server)
    api = hub_server.api(hub_server.tokens.write)
    api.create_branch("alice/tiny", branch="release/1")
    api.create_tag("alice/tiny", tag="v1.0")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/tiny", revision="release/1")
    refs = api.list_repo_refs("alice/tiny")
    assert {b.name for b in refs.branches} == {"main", "release/1"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    assert [c.commit_id for c in api.list_repo_commits("alice/tiny", revision="release/1")][1:] == [first]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("alice/tiny", branch="release/1")
    assert _status(err) == 409
    api.delete_tag("alice/tiny", tag="v1.0")
    assert "refs/tags/v1.0" not in hub_server.refs("alice/tiny")


def test_readme_metadata_is_validated_through_the_endpoint(hub_server: HubServer) -> None:
    api = hub_server.api(hub_server.tokens.write)
    api.create_repo("alice/carded")
    readme = b"---\nlicense: mit\nlibrary_name: timm\n---\n# Card\n"
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="alice/carded")
    info = api.model_info("alice/carded")
    assert info.card_data.license == "mit" and info.library_name == "timm"
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\n- [unbalanced\n---\n", path_in_repo="README.md", repo_id="alice/carded")


def test_whoami(hub_server: HubServer) -> None:
    me = hub_server.api(hub_server.tokens.write).whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert hub_server.api(hub_server.tokens.read).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        hub_server.api(hub_server.tokens.invalid).whoami()
    assert _status(err) == 401


# ----- error mapping ------------------------------------------------------------------------------------------


def test_missing_repo_revision_and_entry(hub_server: HubServer, tmp_path: Path) -> None:
    _seed(hub_server)
    anonymous, alice = hub_server.api(False), hub_server.api(hub_server.tokens.write)
    for api, status in ((anonymous, 401), (alice, 404)):
        with pytest.raises(RepositoryNotFoundError) as err:
            api.model_info("alice/nope")
        assert _status(err) == status and not isinstance(err.value, GatedRepoError)
    with pytest.raises(RevisionNotFoundError):
        anonymous.model_info("alice/tiny", revision="no-such-branch")

    kwargs = {"endpoint": hub_server.endpoint, "token": False}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "config.json", cache_dir=tmp_path / "a", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/tiny", "config.json", revision="no-such-branch", cache_dir=tmp_path / "b", **kwargs)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/tiny", "missing.bin", cache_dir=tmp_path / "c", **kwargs)
    head = hub_server.head("alice/tiny")  # the 404 carried X-Repo-Commit, so the client cached the absence
    assert (tmp_path / "c" / "models--alice--tiny" / ".no_exist" / head / "missing.bin").exists()


def test_private_repo_needs_owner_token(hub_server: HubServer, tmp_path: Path) -> None:
    _seed(hub_server, private=True)
    kwargs = {"cache_dir": tmp_path / "cache", "endpoint": hub_server.endpoint}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/tiny", "config.json", token=False, **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/tiny", "config.json", token=hub_server.tokens.other, **kwargs)
    path = hf_hub_download("alice/tiny", "config.json", token=hub_server.tokens.read, **kwargs)
    assert Path(path).read_text() == CONFIG


def test_gated_repo(hub_server: HubServer, tmp_path: Path) -> None:
    _seed(hub_server, gated="manual")
    assert hub_server.api(False).model_info("alice/tiny").gated == "manual"  # metadata stays public
    download = functools.partial(hf_hub_download, "alice/tiny", "config.json", endpoint=hub_server.endpoint)
    with pytest.raises(GatedRepoError) as err:
        download(token=False, cache_dir=tmp_path / "a")
    assert _status(err) == 401
    with pytest.raises(GatedRepoError) as err:
        download(token=hub_server.tokens.other, cache_dir=tmp_path / "b")
    assert _status(err) == 403
    hub_server.grant_access("alice/tiny", "bob")
    assert Path(download(token=hub_server.tokens.other, cache_dir=tmp_path / "c")).read_text() == CONFIG


def test_invalid_token_is_401_not_repo_not_found(hub_server: HubServer, tmp_path: Path) -> None:
    _seed(hub_server)
    with pytest.raises(HfHubHTTPError) as err:
        hub_server.api(hub_server.tokens.invalid).model_info("alice/tiny")
    assert _status(err) == 401 and not isinstance(err.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as err:
        token = hub_server.tokens.invalid
        hf_hub_download("alice/tiny", "config.json", cache_dir=tmp_path, endpoint=hub_server.endpoint, token=token)
    assert _status(err) == 401 and not isinstance(err.value, RepositoryNotFoundError)


def test_writes_without_permission_are_403(hub_server: HubServer) -> None:
    _seed(hub_server)
    read_only = hub_server.api(hub_server.tokens.read)
    with pytest.raises(HfHubHTTPError) as err:
        read_only.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/tiny")
    assert _status(err) == 403
    with pytest.raises(HfHubHTTPError) as err:
        read_only.create_repo("alice/other")
    assert _status(err) == 403
    with pytest.raises(HfHubHTTPError) as err:
        hub_server.api(hub_server.tokens.other).create_repo("alice/by-bob")
    assert _status(err) == 403
    assert hub_server.repo_ids() == ["alice/tiny"] and len(hub_server.commits("alice/tiny")) == 1


def test_rate_limit(hub_server: HubServer, tmp_path: Path) -> None:
    _seed(hub_server)
    api = hub_server.api(False)
    hub_server.rate_limit(1, retry_after=7)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info("alice/tiny")  # no retry on this endpoint
    assert _status(err) == 429 and err.value.response.headers["Retry-After"] == "7"
    assert api.model_info("alice/tiny").id == "alice/tiny"  # the limit is spent

    # With nothing cached, hf_hub_download retries a HEAD that failed with 429 (here at once: Retry-After 0).
    hub_server.rate_limit(1, path_contains="/resolve/")
    path = hf_hub_download("alice/tiny", "config.json", cache_dir=tmp_path, endpoint=hub_server.endpoint, token=False)
    assert Path(path).read_text() == CONFIG
    assert [r.status for r in hub_server.requests if r.method == "HEAD"] == [429, 200]


def test_list_models_retries_after_429(hub_server: HubServer) -> None:
    _seed(hub_server)
    hub_server.rate_limit(1, retry_after=0)  # the client waits Retry-After + 1 s, then retries
    assert [m.id for m in hub_server.api(False).list_models(author="alice")] == ["alice/tiny"]
    assert [r.status for r in hub_server.requests if r.path == "/api/models"] == [429, 200]


def test_drop_connection_cuts_downloads_and_the_client_resumes(hub_server: HubServer, tmp_path: Path) -> None:
    big = os.urandom(12 * 1024 * 1024)  # above one 10 MiB download chunk of the client
    hub_server.add_repo("alice/big", {"model.safetensors": big, "config.json": CONFIG})
    url = f"{hub_server.endpoint}/alice/big/resolve/main/model.safetensors"

    # The cut: headers announce the whole file, the body stops short, then the connection is closed or reset.
    hub_server.drop_connection(1000, times=2, path_contains="model.safetensors")
    for _ in range(2):
        with urllib.request.urlopen(url) as response:
            assert response.headers["Content-Length"] == str(len(big))
            with pytest.raises(http.client.IncompleteRead) as cut:
                response.read()
            assert cut.value.partial == big[:1000]
    with urllib.request.urlopen(url) as response:  # the two cuts are used up
        assert response.read() == big
    hub_server.drop_connection(1000, reset=True)
    with pytest.raises(ConnectionResetError):
        with urllib.request.urlopen(url) as response:
            response.read()
    hub_server.drop_connection(0, times=0)  # clears pending faults
    with urllib.request.urlopen(url) as response:
        assert response.read() == big
    hub_server.requests.clear()

    # Only downloads are cut (not HEAD, not API calls); the real client resumes from its last whole chunk.
    hub_server.drop_connection(11 * 1024 * 1024)
    assert hub_server.api(False).model_info("alice/big").sha
    path = hf_hub_download("alice/big", "config.json", cache_dir=tmp_path, endpoint=hub_server.endpoint, token=False)
    assert Path(path).read_text() == CONFIG  # smaller than the cut: sent whole, the fault stays pending
    path = hf_hub_download("alice/big", "model.safetensors", cache_dir=tmp_path, endpoint=hub_server.endpoint, token=False)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == hashlib.sha256(big).hexdigest()
    gets = [(r.status, r.range, r.dropped_after) for r in hub_server.requests
            if r.method == "GET" and r.path.endswith("model.safetensors")]
    assert gets == [(200, None, 11 * 1024 * 1024), (206, f"bytes={10 * 1024 * 1024}-", None)]


# ----- library code via HF_ENDPOINT ---------------------------------------------------------------------------


def test_transformers_autoconfig_in_subprocess(hub_server: HubServer) -> None:
    hub_server.add_repo("alice/tiny-vit", {"config.json": CONFIG})
    code = (
        "from transformers import AutoConfig\n"
        "config = AutoConfig.from_pretrained('alice/tiny-vit')\n"
        "print(config.model_type, config.num_labels)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**env, **hub_server.env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["vit", "3"]
    assert any(r.path.endswith("/config.json") and r.status == 200 for r in hub_server.requests)


def test_lfs_rule() -> None:
    assert is_lfs_path("weights/model.safetensors", 10) and is_lfs_path("pytorch_model.bin", 0)
    assert not is_lfs_path("config.json", 1000) and is_lfs_path("big.json", 11 * 1024 * 1024)
