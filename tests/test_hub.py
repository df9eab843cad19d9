"""Hub sources and publishing against the loopback Hub (``hubserver.py``), over real HTTP.

The code under test gets the server through the environment it reads at call time
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), set with monkeypatch;
nothing in huggingface_hub is patched. Reloading with plain transformers/timm runs in a
subprocess because those libraries fix the endpoint when huggingface_hub is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import CommitOperationAdd, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load as load_safetensors

import otbr_hub
from otbr_hub import fetch
from otbr_hub.card import render_card
from otbr_hub.cli import main
from otbr_hub.errors import HubError, OtbrError, UnsupportedModelError
from otbr_hub.fetch import load_source, parse_source
from otbr_hub.load import from_model, load_folder
from otbr_hub.push import publish, push_to_hub, verify_saved
from otbr_hub.repair import load_any
from otbr_hub.save import save_model
from hubserver import HubServer
from tiny import timm_folder, tiny_timm, tiny_vit, transformers_folder

FAST = ["--unlearn-steps", "2", "--unlearn-batch", "16", "--verify-samples", "32", "--prune-ratio", "0.05", "--device", "cpu"]
FAST_KW = dict(unlearn_steps=2, unlearn_batch=16, verify_samples=32, prune_ratio=0.05, device="cpu")
SOURCE_README = "# Tiny ViT\n\nTrained on nothing at all.\n\n## Intended use\n\nTests.\n"


@pytest.fixture(autouse=True)
def _no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the retry logic but not its sleeps."""
    monkeypatch.setattr(fetch, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def use_hub(monkeypatch: pytest.MonkeyPatch, hub: HubServer, cache: Path, token: str | None = None) -> None:
    """Point otbr-hub at the loopback Hub with a private cache, as a user would with env vars."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def files_of(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def seed_vit(hub: HubServer, tmp: Path, repo: str = "alice/vit", **kw: object) -> str:
    folder = transformers_folder(tmp / f"seed-{repo.replace('/', '-')}")
    kw.setdefault("card_data", {"license": "mit"})
    kw.setdefault("readme", SOURCE_README)
    return hub.add_repo(repo, files_of(folder), library_name="transformers", pipeline_tag="image-classification", **kw)


def seed_timm(hub: HubServer, tmp: Path, repo: str = "alice/resnet", **kw: object) -> str:
    folder = timm_folder(tmp / f"seed-{repo.replace('/', '-')}")
    return hub.add_repo(repo, files_of(folder), library_name="timm", pipeline_tag="image-classification", **kw)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The console script, in-process; ``sys.argv`` is what the real entry point would see
    (the report records the command from it)."""
    saved = sys.argv
    sys.argv = ["otbr-hub", *args]
    try:
        code = main(args)
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out, out.err


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().sum() for t in tensors.values() if t.is_floating_point()))


# ----- sources ------------------------------------------------------------------------------------------------


def test_parse_source() -> None:
    assert parse_source("alice/vit") == fetch.SourceRef("alice/vit")
    assert parse_source("alice/vit@v1.0") == fetch.SourceRef("alice/vit", "v1.0")
    assert parse_source("alice/vit@refs/pr/3") == fetch.SourceRef("alice/vit", "refs/pr/3")
    assert parse_source("hf-hub:alice/resnet") == fetch.SourceRef("alice/resnet", None, timm_prefix=True)
    assert parse_source("alice/vit@" + "a" * 40).revision == "a" * 40
    assert not fetch.is_repo_id("./alice/vit") and not fetch.is_repo_id("vit")
    for bad in ("alice/vit@", "alice/vit@@v1", "alice/vit@v1@v2"):  # an empty or doubled revision is no repo id
        assert not fetch.is_repo_id(bad), bad
        with pytest.raises(OtbrError, match="neither a folder nor a Hub repo id"):
            load_any(bad)


def test_sharded_save_loads_back_and_downloads(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import save_torch_state_dict

    vit = tiny_vit()
    out = save_model(from_model(vit), vit, tmp_path / "vit", max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    reloaded = load_folder(out).model.state_dict()
    assert all(torch.equal(v.float(), reloaded[k]) for k, v in vit.state_dict().items())

    # timm reads a single model.safetensors, so a timm model is never sharded on save...
    model = tiny_timm()
    out = save_model(from_model(model, input_size=(1, 28, 28)), model, tmp_path / "timm-one", max_shard_size=20_000)
    assert not list(out.glob("model-*.safetensors")) and (out / "model.safetensors").is_file()
    # ...but a sharded timm source (written by another tool) still loads
    (tmp_path / "timm").mkdir()
    shutil.copyfile(out / "config.json", tmp_path / "timm" / "config.json")
    save_torch_state_dict(model.state_dict(), tmp_path / "timm", max_shard_size=20_000)
    assert len(list((tmp_path / "timm").glob("model-*.safetensors"))) > 2
    reloaded = load_folder(tmp_path / "timm").model.state_dict()
    assert all(torch.equal(v.float(), reloaded[k]) for k, v in model.state_dict().items())

    sha = hub_server.add_repo("alice/sharded", files_of(tmp_path / "timm"), library_name="timm")
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    loaded = load_source("alice/sharded")
    assert loaded.revision == sha and loaded.library == "timm"
    assert {p.name for p in loaded.folder.glob("model-*.safetensors")} == {p.name for p in (tmp_path / "timm").glob("model-*")}
    assert checksum(loaded.model.state_dict()) == pytest.approx(checksum(tiny_timm().state_dict()))


def test_revisions_resolve_to_commit_shas_and_only_needed_files_download(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    first = seed_vit(hub_server, tmp_path)
    hub_server.create_tag("alice/vit", "v1")
    second = hub_server.commit("alice/vit", {"pytorch_model.bin": b"not loaded: safetensors wins", "notes/big.txt": "x" * 1000})
    hub_server.create_branch("alice/vit", "dev", revision=first)
    pr_sha = hub_server.api(hub_server.tokens.other).create_commit(
        "alice/vit", [CommitOperationAdd("proposal.txt", b"hi")], commit_message="proposal", create_pr=True).oid
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=hub_server.tokens.read)

    expected = {"alice/vit": second, "alice/vit@main": second, "alice/vit@v1": first, "alice/vit@dev": first,
                f"alice/vit@{first}": first, "alice/vit@refs/pr/1": pr_sha}
    for text, sha in expected.items():
        loaded = load_source(text)
        assert (loaded.source, loaded.revision, loaded.library) == ("alice/vit", sha, "transformers"), text
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub_server.requests if "/resolve/" in r.path}
    assert downloaded == {"config.json", "preprocessor_config.json", "model.safetensors", "README.md"}
    infos = [r for r in hub_server.requests if r.method == "GET" and re.fullmatch(r"/api/models/alice/vit(/revision/.+)?", r.path)]
    assert len(infos) == len(expected) and all(r.query.get("blobs", [""])[0].lower() == "true" for r in infos)

    with pytest.raises(UnsupportedModelError, match="only for timm"):
        load_source("hf-hub:alice/vit")


def test_bin_only_repo_loads_without_pickle_code(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    folder = timm_folder(tmp_path / "src")
    torch.save(load_folder(folder).model.state_dict(), tmp_path / "pytorch_model.bin")
    sha = hub_server.add_repo("alice/binonly", {"config.json": folder / "config.json",
                                                "pytorch_model.bin": tmp_path / "pytorch_model.bin"}, library_name="timm")
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    loaded = load_source("hf-hub:alice/binonly")
    assert loaded.revision == sha and (loaded.folder / "pytorch_model.bin").is_file()


def test_transient_failures_are_retried_and_offline_uses_the_cache(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    sha = seed_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    hub_server.rate_limit(2, retry_after=0)  # the preflight is refused twice
    assert load_source("alice/resnet").revision == sha
    hub_server.rate_limit(2, retry_after=0, path_contains="model.safetensors")  # then the weight download
    assert load_source("alice/resnet").revision == sha

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub_server.requests)
    assert load_source("alice/resnet").revision == sha
    assert load_source(f"alice/resnet@{sha}").revision == sha
    assert len(hub_server.requests) == seen  # nothing went over the network
    from otbr_hub.detect import DetectSettings
    from otbr_hub.scan import ScanSettings, scan_target

    settings = ScanSettings(detector=DetectSettings(steps=5, inputs_per_class=2, device="cpu"), cache_dir=str(tmp_path / "cache"))
    report = scan_target("alice/resnet", settings=settings)  # scan uses the same cache, offline too
    assert report.verdict in ("clean", "suspicious", "backdoored") and report.revision == sha, (report.verdict, report.error)
    assert [f.path for f in report.files] == ["model.safetensors"] and len(hub_server.requests) == seen
    assert "not in the cache" in (scan_target("alice/never", settings=settings).error or "")


def test_a_branch_moving_during_the_download_gives_one_consistent_snapshot(hub_server: HubServer, tmp_path: Path,
                                                                            monkeypatch) -> None:
    old = seed_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    moved: list[str] = []  # someone pushes between the API check and the config download
    hub_server.before_request("/resolve/main/config.json",
                              lambda: moved.append(hub_server.commit("alice/resnet", {"notes.txt": "a push"})))
    loaded = load_source("alice/resnet")
    assert moved and moved[0] != old and loaded.revision == moved[0]  # the commit the cache's branch record names
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # so offline mode finds every file of it
    assert load_source("alice/resnet").revision == moved[0]


# ----- publishing ---------------------------------------------------------------------------------------------


_RELOAD = """
import json, sys, timm, torch
from transformers import AutoModelForImageClassification

def total(model):
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))

vit = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
resnet = timm.create_model("hf-hub:" + sys.argv[2], pretrained=True).eval()
with torch.no_grad():
    vit(pixel_values=torch.zeros(1, 3, 32, 32)); resnet(torch.zeros(1, 1, 28, 28))
print(json.dumps({"vit": [type(vit).__name__, total(vit)], "resnet": [type(resnet).__name__, total(resnet)]}))
"""


def test_push_and_reload_with_plain_transformers_and_timm(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    vit_sha = seed_vit(hub_server, tmp_path)
    seed_timm(hub_server, tmp_path)
    token = hub_server.tokens.write
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=token)

    code, out, err = cli(["repair", "alice/vit", "--push", "-q", *FAST], capsys)
    assert code == 0, err
    code, out, err = cli(["repair", "hf-hub:alice/resnet", "--push", "--repo-id", "resnet-clean", *FAST], capsys)
    assert code == 0, err
    assert f"pushed to {hub_server.endpoint}/alice/resnet-clean" in out

    for repo in ("alice/vit-otbr", "alice/resnet-clean"):
        history = hub_server.commits(repo)
        assert len(history) == 2 and history[1].title == "initial commit"  # everything in ONE commit
        files = hub_server.files(repo)
        assert {"README.md", "otbr_report.json", "config.json", "model.safetensors"} <= files.keys()
        text = b"".join(files.values())
        assert token.encode() not in text
    assert "preprocessor_config.json" in hub_server.files("alice/vit-otbr")
    assert not hub_server.repo("alice/vit-otbr").private and not hub_server.repo("alice/resnet-clean").private

    card = ModelCard(hub_server.files("alice/vit-otbr")["README.md"].decode())
    assert card.data.base_model == "alice/vit" and card.data.base_model_relation == "finetune"
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert {"otbr", "backdoor-defense", "image-classification", "transformers"} <= set(card.data.tags)
    assert "## Original model card" in card.text and "Trained on nothing at all." in card.text
    assert card.text.count("license: mit") == 0  # the source's YAML header is not pasted into the body
    assert vit_sha in card.text and "neurons pruned" in card.text
    assert "otbr-hub repair alice/vit --push -q --unlearn-steps 2" in card.text

    timm_card = ModelCard(hub_server.files("alice/resnet-clean")["README.md"].decode())
    assert timm_card.data.library_name == "timm" and timm_card.data.base_model == "alice/resnet"
    assert "license" not in timm_card.data.to_dict()  # the source has none: never invent one
    report = json.loads(hub_server.files("alice/resnet-clean")["otbr_report.json"])
    assert report["revision"] == hub_server.head("alice/resnet") and report["publish_verification"]["ok"]

    proc = subprocess.run([sys.executable, "-c", _RELOAD, "alice/vit-otbr", "alice/resnet-clean"],
                          env={**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **hub_server.env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["vit"][0] == "ViTForImageClassification" and got["resnet"][0] == "ResNet"
    assert got["vit"][1] == pytest.approx(checksum(load_safetensors(hub_server.files("alice/vit-otbr")["model.safetensors"])))
    assert got["resnet"][1] == pytest.approx(checksum(load_safetensors(hub_server.files("alice/resnet-clean")["model.safetensors"])))


def test_python_api_push_and_a_moved_parent_commit(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    seed_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=hub_server.tokens.write)
    result = otbr_hub.repair("alice/resnet", push=True, repo_id="alice/resnet-api", **FAST_KW)
    assert ModelCard(hub_server.files("alice/resnet-api")["README.md"].decode()).data.base_model == "alice/resnet"

    seen = hub_server.head("alice/resnet-api")
    hub_server.commit("alice/resnet-api", {"notes.txt": "someone else was faster"})
    moved = hub_server.head("alice/resnet-api")
    with pytest.raises(HubError, match="changed while publishing") as err:
        push_to_hub(result, "alice/resnet-api", parent_commit=seen, report={**result.report.to_dict(), "command": "again"})
    assert len(str(err.value).splitlines()) == 1
    assert hub_server.head("alice/resnet-api") == moved  # nothing was written

    with pytest.raises(HubError, match="no write permission on bob/x"):
        push_to_hub(result, "bob/x")
    with pytest.raises(OtbrError, match="never writes to it directly"):
        push_to_hub(result, "alice/resnet")
    assert "bob/x" not in hub_server.repo_ids() and len(hub_server.commits("alice/resnet")) == 1

    hub_server.commit("alice/resnet", {"notes.txt": "the source moved on"})
    with pytest.raises(HubError, match="moved on"):  # a PR must start from the branch head it was made from
        publish(result, result.report.to_dict(), pr=True)
    assert not hub_server.discussions("alice/resnet")

    broken = tmp_path / "broken"
    save_model(result.source, result.model, broken)
    sd = load_safetensors((broken / "model.safetensors").read_bytes())
    sd["fc.weight"] = torch.zeros_like(sd["fc.weight"])
    from safetensors.torch import save_file

    save_file(sd, broken / "model.safetensors")
    with pytest.raises(OtbrError, match="refusing to publish"):
        verify_saved(result, broken)


def test_pull_request_is_courteous_and_opened_once(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    sha = seed_timm(hub_server, tmp_path, readme="# ResNet\n")
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=hub_server.tokens.other)  # bob proposes to alice

    code, out, err = cli(["repair", "alice/resnet", "--pr", *FAST], capsys)
    assert code == 0, err
    url = f"{hub_server.endpoint}/alice/resnet/discussions/1"
    assert url in out
    assert hub_server.head("alice/resnet") == sha  # main untouched
    (pr,) = hub_server.discussions("alice/resnet")
    assert pr.is_pull_request and pr.target_branch == "refs/heads/main" and sha[:12] in pr.title
    for phrase in ("opened automatically", "safely ignore", "How it was verified", sha):
        assert phrase in pr.description
    assert hub_server.tokens.other not in pr.description
    proposed, original = hub_server.files("alice/resnet", "refs/pr/1"), hub_server.files("alice/resnet")
    assert proposed["model.safetensors"] != original["model.safetensors"] and "otbr_report.json" in proposed
    assert proposed["README.md"] == original["README.md"]
    # the owner's config, with the one entry the activation bounds need (else the weights load unbounded)
    expected = json.loads(original["config.json"])
    expected["model_args"] = {**(expected.get("model_args") or {}), "act_layer": "relu6"}
    assert json.loads(proposed["config.json"]) == expected
    assert "`act_layer: relu6`" in pr.description

    code, out, err = cli(["repair", "alice/resnet", "--pr", *FAST], capsys)
    assert code == 0, err
    assert url in out and len(hub_server.discussions("alice/resnet")) == 1  # no second PR for this commit


_PRIVATE_RELOAD = """
import json, os, sys, timm

try:
    timm.create_model("hf-hub:" + sys.argv[1], pretrained=True)
    anonymous = "loaded"
except Exception as err:
    anonymous = type(err).__name__
os.environ["HF_TOKEN"] = os.environ.pop("RELOAD_TOKEN")
model = timm.create_model("hf-hub:" + sys.argv[1], pretrained=True).eval()
total = float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))
print(json.dumps({"anonymous": anonymous, "with_token": [type(model).__name__, total]}))
"""


def test_push_private_repo_is_hidden_without_a_token(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    tokens = hub_server.tokens
    seed_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=tokens.write)
    code, out, err = cli(["repair", "alice/resnet", "--push", "--private", "--repo-id", "resnet-private", *FAST], capsys)
    assert code == 0, err
    assert tokens.write not in out + err
    (create,) = [r for r in hub_server.requests if r.path == "/api/repos/create"]
    assert create.status == 200 and create.user == "alice"
    assert hub_server.repo("alice/resnet-private").private  # the flag create_repo sent was recorded
    pushed = hub_server.files("alice/resnet-private")
    assert {"README.md", "otbr_report.json", "config.json", "model.safetensors"} <= pushed.keys()
    assert len(hub_server.commits("alice/resnet-private")) == 2

    # Like the Hub: a private repo does not exist for anyone but its namespace (401 anonymous, 404 signed in).
    with pytest.raises(RepositoryNotFoundError) as anon:
        hub_server.api(False).model_info("alice/resnet-private")
    assert anon.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other:
        hub_server.api(tokens.other).model_info("alice/resnet-private")
    assert other.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/resnet-private", "model.safetensors", cache_dir=tmp_path / "anon-cache",
                        endpoint=hub_server.endpoint, token=False)
    assert "alice/resnet-private" not in {m.id for m in hub_server.api(False).list_models(author="alice")}

    # otbr-hub's own fetch path: a one-line hint without a token, the pushed weights with one.
    use_hub(monkeypatch, hub_server, tmp_path / "cache-anon")
    with pytest.raises(HubError, match="if it is private, set HF_TOKEN") as missing:
        load_source("alice/resnet-private")
    assert len(str(missing.value).splitlines()) == 1
    use_hub(monkeypatch, hub_server, tmp_path / "cache-read", token=tokens.read)
    loaded = load_source("alice/resnet-private")
    assert loaded.revision == hub_server.head("alice/resnet-private")
    pushed_total = checksum(load_safetensors(pushed["model.safetensors"]))
    assert checksum(loaded.model.state_dict()) == pytest.approx(pushed_total)

    # Plain timm, as a user of the private repo would load it.
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_CACHE")}, **hub_server.env,
           "RELOAD_TOKEN": tokens.read}
    proc = subprocess.run([sys.executable, "-c", _PRIVATE_RELOAD, "alice/resnet-private"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["anonymous"] == "RepositoryNotFoundError"
    assert got["with_token"][0] == "ResNet" and got["with_token"][1] == pytest.approx(pushed_total)


# ----- interrupted downloads ----------------------------------------------------------------------------------

MiB = 1024 * 1024


def seed_big_timm(hub: HubServer, tmp: Path, repo: str = "alice/big") -> tuple[str, bytes]:
    """A timm repo whose ``model.safetensors`` is above 10 MiB (one full download chunk of huggingface_hub)
    and still cheap to repair: a wide last stage on 1x1 feature maps."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=(8, 16, 32, 576), stem_width=8, in_chans=1,
                              num_classes=10).eval()
    folder = save_model(from_model(model, input_size=(1, 28, 28), mean=(0.286,), std=(0.353,)), model, tmp / "seed-big")
    weights = (folder / "model.safetensors").read_bytes()
    assert len(weights) > 11 * MiB + 64 * 1024
    sha = hub.add_repo(repo, files_of(folder), library_name="timm", pipeline_tag="image-classification")
    return sha, weights


def weight_gets(hub: HubServer) -> list[tuple[int, str | None, int | None]]:
    """(status, Range header, bytes sent before the cut) of each GET of the weights."""
    return [(r.status, r.range, r.dropped_after) for r in hub.requests
            if r.method == "GET" and r.path.endswith("/model.safetensors")]


def test_dropped_download_resumes_with_a_range_request(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys,
                                                       caplog) -> None:
    sha, weights = seed_big_timm(hub_server, tmp_path)
    token = hub_server.tokens.read
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=token)
    hub_server.drop_connection(11 * MiB, path_contains="model.safetensors")  # once: the first GET of the weights
    caplog.set_level(logging.INFO, logger="otbr_hub")

    code, out, err = cli(["repair", "alice/big", "-o", str(tmp_path / "out"), *FAST], capsys)
    assert code == 0, err
    # The body ended after 11 MiB; huggingface_hub kept the whole 10 MiB chunk and asked for the rest.
    assert weight_gets(hub_server) == [(200, None, 11 * MiB), (206, f"bytes={10 * MiB}-", None)]
    cached = tmp_path / "cache" / "models--alice--big" / "snapshots" / sha / "model.safetensors"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == hashlib.sha256(weights).hexdigest()
    assert not list((tmp_path / "cache").rglob("*.incomplete"))
    report = json.loads((tmp_path / "out" / "otbr_report.json").read_text())
    assert report["source"] == "alice/big" and report["revision"] == sha
    # The client's two-line warning became one otbr-hub log line (shown with -v), not terminal noise.
    notes = [r for r in caplog.records if r.name == "otbr_hub" and "Trying to resume download" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert "Traceback" not in err and token not in out + err + caplog.text


def test_reset_connection_mid_download_starts_the_file_again(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    sha, weights = seed_big_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    hub_server.drop_connection(11 * MiB, path_contains="model.safetensors", reset=True)
    loaded = load_source("alice/big")
    # huggingface_hub does not resume after a reset (and deletes its partial file): otbr-hub's retry
    # downloads the file again, whole.
    assert weight_gets(hub_server) == [(200, None, 11 * MiB), (200, None, None)]
    assert loaded.revision == sha
    assert hashlib.sha256((loaded.folder / "model.safetensors").read_bytes()).hexdigest() == hashlib.sha256(weights).hexdigest()
    assert checksum(loaded.model.state_dict()) == pytest.approx(checksum(load_safetensors(weights)))


def test_download_that_keeps_breaking_is_one_line_network_failure(hub_server: HubServer, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    seed_timm(hub_server, tmp_path)
    token = hub_server.tokens.read
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=token)
    monkeypatch.setattr(fetch, "RETRY_DELAYS", (0.0,))  # one retry by otbr-hub (each call costs the client ~5 s)
    hub_server.drop_connection(1000, times=1000, path_contains="model.safetensors")

    code, out, err = cli(["repair", "alice/resnet", "-o", str(tmp_path / "out"), *FAST], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "network failure while downloading model.safetensors from alice/resnet" in lines[0]
    assert "RemoteProtocolError after 2 attempts" in lines[0] and "run again" in lines[0]
    assert "Traceback" not in err and token not in out + err
    # Each of the 2 hf_hub_download calls tried 6 times (5 resumes without progress), every body cut.
    gets = weight_gets(hub_server)
    assert len(gets) == 12 and all(g == (200, None, 1000) for g in gets)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


def test_rate_limit_waits_for_retry_after(hub_server: HubServer, tmp_path: Path, monkeypatch) -> None:
    sha = seed_timm(hub_server, tmp_path)
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    hub_server.rate_limit(1, retry_after=1)
    start = time.monotonic()
    assert load_source("alice/resnet").revision == sha
    assert time.monotonic() - start >= 1.0  # the Hub's Retry-After, not the (zeroed) default delay
    first, second = [r for r in hub_server.requests if r.path == "/api/models/alice/resnet"][:2]
    assert (first.status, second.status) == (429, 200)


# ----- errors -------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_errors_are_one_line(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    tokens = hub_server.tokens
    seed_timm(hub_server, tmp_path)
    seed_timm(hub_server, tmp_path, "alice/secret", private=True)
    seed_timm(hub_server, tmp_path, "alice/gated", gated=True)
    hub_server.add_repo("alice/bert", {"config.json": json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}),
                                       "model.safetensors": b"x"}, pipeline_tag="fill-mask", library_name="transformers")
    hub_server.add_repo("alice/noweights", {"config.json": json.dumps({"architecture": "resnet18", "num_classes": 10})},
                        library_name="timm")
    hub_server.add_repo("alice/listcfg", {"config.json": "[1, 2]", "model.safetensors": b"x"}, library_name="timm")
    dead = f"http://127.0.0.1:{_closed_port()}"

    # name: (args, token, expected text, extra setup)
    cases = {
        "missing repo": (["alice/nope"], tokens.read, "not found", None),
        "private without token": (["alice/secret"], None, "set HF_TOKEN", None),
        "gated, anonymous": (["alice/gated"], None, "request access", None),
        "gated, no access": (["alice/gated"], tokens.other, "is gated", None),
        "missing revision": (["alice/resnet@nope"], tokens.read, "revision 'nope' not found", None),
        "invalid token": (["alice/resnet"], tokens.invalid, "rejected the token", None),
        "not an image classifier": (["alice/bert"], None, "not an image classifier", None),
        "no weights": (["alice/noweights"], None, "no loadable weights", None),
        "config not an object": (["alice/listcfg"], None, "alice/listcfg: config.json holds a JSON list", None),
        "rate limited": (["alice/resnet"], None, "rate limiting", lambda: hub_server.rate_limit(50, retry_after=0)),
        "long Retry-After": (["alice/resnet"], None, "wait 3600 s", lambda: hub_server.rate_limit(1, retry_after=3600)),
        "network down": (["alice/resnet"], tokens.read, "cannot reach the Hub", lambda: monkeypatch.setenv("HF_ENDPOINT", dead)),
        "offline, not cached": (["alice/resnet"], None, "not in the cache", lambda: monkeypatch.setenv("HF_HUB_OFFLINE", "1")),
        "push with a read token": (["alice/resnet", "--push"], tokens.read, "no write permission", None),
        "push with an invalid token": (["alice/resnet", "--push"], tokens.invalid, "rejected the token", None),
        "push, network down": (["alice/resnet", "--push"], tokens.write, "publishing needs the Hub",
                               lambda: monkeypatch.setenv("HF_ENDPOINT", dead)),
    }
    for i, (name, (args, token, expected, setup)) in enumerate(cases.items()):
        use_hub(monkeypatch, hub_server, tmp_path / f"cache-{i}", token=token)
        hub_server.rate_limit(0)
        if setup:
            setup()
        code, out, err = cli(["repair", *args, "-o", str(tmp_path / f"out-{i}"), *FAST], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and expected in lines[0], (name, err)
        assert "Traceback" not in err, name
        for secret in (tokens.read, tokens.write, tokens.other, tokens.invalid):
            assert secret not in out + err, name
    assert "alice/resnet-otbr" not in hub_server.repo_ids()


def test_publication_problems_are_refused_before_any_download(hub_server: HubServer, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    """A destination or option the publication cannot use fails in seconds, before the model
    is fetched or repaired, and nothing is written anywhere."""
    seed_timm(hub_server, tmp_path)
    local = timm_folder(tmp_path / "local")
    tokens = hub_server.tokens
    cases = {
        "--pr on a local folder": ([str(local), "--pr"], tokens.write, "--pr needs a source on the Hub"),
        "--pr with --repo-id": (["alice/resnet", "--pr", "--repo-id", "alice/x"], tokens.write, "--repo-id names"),
        "--pr with --private": (["alice/resnet", "--pr", "--private"], tokens.write, "--private applies to --push"),
        "push into another namespace": (["alice/resnet", "--push", "--repo-id", "alice/copy"], tokens.other,
                                        "no write permission on alice/copy"),
        "push onto the source, other case": (["alice/resnet", "--push", "--repo-id", "Alice/ResNet"], tokens.write,
                                             "is the source repo"),
        "two revisions": (["alice/resnet@main", "--revision", "v2", "--push"], tokens.write, "already pins revision main"),
        "several, one local with --pr": (["alice/resnet", str(local), "--pr"], tokens.write, "--pr needs a source on the Hub"),
    }
    for i, (name, (args, token, expected)) in enumerate(cases.items()):
        use_hub(monkeypatch, hub_server, tmp_path / f"cache-{i}", token=token)
        hub_server.requests.clear()
        code, out, err = cli(["repair", *args, *FAST], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, err)
        assert weight_gets(hub_server) == [], name  # refused before the model was fetched
        assert not any(r.method in ("POST", "PUT") for r in hub_server.requests), name
    assert sorted(hub_server.repo_ids()) == ["alice/resnet"] and hub_server.discussions("alice/resnet") == []


# ----- card ---------------------------------------------------------------------------------------------------


def test_card_metadata_results_and_original_card() -> None:
    report = {
        "source": "alice/vit", "revision": "c" * 40, "library": "transformers", "otbr_hub_version": "0.1.0",
        "prune_ratio": 0.05, "ratio_reason": "largest ratio keeping agreement", "lam": 0.5,
        "ratio_candidates": [{"ratio": 0.05, "agreement": 0.97, "backdoor_p": 0.4, "flagged": False}],
        "neurons_pruned": 7, "neurons_scored": 140, "layers_scored": 4, "pruned_per_layer": {"encoder.layer.0": 7},
        "verification": {"ok": True, "agreement": 0.97}, "settings": {"seed": 0},
        "evaluation": {"dataset": "fashion_mnist", "trigger": {"name": "badnets", "target": 3},
                       "before": {"acc": 90.0, "asr": 99.0, "ra": 1.0}, "after": {"acc": 88.5, "asr": 3.5, "ra": 80.0}, "der": 0.97},
        "scan_before": {"verdict": "backdoored", "p_value": 0.001, "suspected_target": 3}, "scan_after": None,
        "command": "otbr-hub repair alice/vit --push",
    }
    readme = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# Tiny\n\n```\n# not a heading\n```\n"
    card = ModelCard(render_card(report, repo_id="bob/vit-otbr", source_readme=readme))
    # the licence file stays in the source repo: the link points there, at the repaired commit
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "tiny-license", f"https://huggingface.co/alice/vit/blob/{'c' * 40}/LICENSE")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 88.5, "attack_success_rate": 3.5}
    for text in ("| source (before repair) | 90.00 | 99.00 |", "| repaired (this model) | 88.50 | 3.50 |",
                 "backdoored", "`encoder.layer.0` | 7", "largest ratio keeping agreement", "## Limitations",
                 "otbr-hub repair alice/vit --push", "## Tiny", "# not a heading"):
        assert text in card.text, text
    assert "license_name" not in card.text

    local = ModelCard(render_card({**report, "source": "/home/me/models/vit", "revision": None, "evaluation": None}))
    assert local.data.base_model is None and local.data.eval_results is None
    assert "/home/me" not in str(local) and "not measured" in local.text


def test_card_says_when_unlearning_batches_were_sliced() -> None:
    base = {"source": "alice/r50", "library": "timm", "prune_ratio": 0.05, "lam": 0.5, "settings": {"seed": 0},
            "verification": {"ok": True, "agreement": 0.9}}
    sliced = render_card({**base, "unlearning": {"steps": 20, "batch": 256, "images_per_pass": 1}}, repo_id="bob/r50-otbr")
    whole = render_card({**base, "unlearning": {"steps": 20, "batch": 256, "images_per_pass": 256}}, repo_id="bob/r50-otbr")
    assert "slices of 1 images" in sliced
    assert "slices of" not in whole and "20 gradient-ascent steps on batches of 256" in whole


def test_card_and_pull_request_carry_the_repair_warnings() -> None:
    from otbr_hub.card import render_pr_description
    from otbr_hub.verify import low_agreement_warning

    warning = low_agreement_warning(0.56)
    base = {"source": "alice/mnv3", "library": "timm", "prune_ratio": 0.01, "lam": 0.5, "settings": {"seed": 0},
            "verification": {"ok": True, "agreement": 0.56}, "warnings": [warning]}
    card = render_card(base, repo_id="bob/mnv3-otbr")
    assert "Check before use" in card and "44 % of the synthesised inputs" in card and "--eval-dataset" in card
    assert "Warning:" in render_pr_description(base, marker="m", files=["model.safetensors"])
    quiet = render_card({**base, "verification": {"ok": True, "agreement": 0.95}, "warnings": []}, repo_id="bob/mnv3-otbr")
    assert "Check before use" not in quiet


def test_what_is_published_names_no_local_paths() -> None:
    from otbr_hub.card import public_command, public_report

    assert public_command("otbr-hub repair /home/me/models/m --eval-dataset=/data/fm -o ~/out") == \
        "otbr-hub repair m --eval-dataset=fm -o out"
    local = public_report({"source": "/home/me/models/m", "revision": None, "command": "otbr-hub repair /home/me/models/m"})
    assert local["source"] == "m" and local["command"] == "otbr-hub repair m"
    hub = public_report({"source": "alice/vit", "revision": "a" * 40, "command": "otbr-hub repair alice/vit"})
    assert hub["source"] == "alice/vit"


def test_stored_login_and_endpoint_passwords_are_never_shown(tmp_path: Path, monkeypatch, capsys) -> None:
    """The client sends the token of `hf auth login` when none is given, and an endpoint may
    carry user:password; neither may reach an error message, a log line or a card."""
    import huggingface_hub.constants as hf_constants

    stored = "hf_stored_login_token_0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(stored)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    ctx = fetch.hub_context()
    assert ctx.token is None and ctx.redact(f"you sent Bearer {stored}") == "you sent Bearer ***"

    endpoint = f"http://alice:SECRETPW@127.0.0.1:{_closed_port()}"
    ctx = fetch.hub_context(endpoint=endpoint)
    assert "SECRETPW" not in ctx.base_url and ctx.base_url.startswith("http://127.0.0.1:")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    code, out, err = cli(["repair", "alice/vit", "-o", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "cannot reach the Hub" in err and "SECRETPW" not in out + err and stored not in out + err


def test_scan_fetches_and_inspects_shards_an_index_keeps_in_a_subfolder(hub_server: HubServer, tmp_path: Path,
                                                                       monkeypatch) -> None:
    from otbr_hub.detect import DetectSettings
    from otbr_hub.scan import ScanSettings, scan_target

    from huggingface_hub import save_torch_state_dict

    out = timm_folder(tmp_path / "m")  # otbr-hub writes timm models as one file: shard it as another tool might
    (out / "model.safetensors").unlink()
    save_torch_state_dict(tiny_timm().state_dict(), out, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files: dict[str, object] = {"config.json": out / "config.json"}
    for shard in sorted(set(index["weight_map"].values())):
        files[f"weights/{shard}"] = out / shard
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index)
    hub_server.add_repo("alice/subshards", files, library_name="timm", pipeline_tag="image-classification")
    use_hub(monkeypatch, hub_server, tmp_path / "cache")
    settings = ScanSettings(detector=DetectSettings(steps=5, inputs_per_class=2, device="cpu"), cache_dir=str(tmp_path / "c"))
    report = scan_target("alice/subshards", settings=settings)
    assert report.verdict in ("clean", "suspicious", "backdoored"), (report.verdict, report.skipped, report.error)
    assert {f.path for f in report.files} >= {p for p in files if p.startswith("weights/")}  # every shard inspected


def test_publishing_review_fixes(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    """A PR whose commit landed but whose answer was lost is not opened twice; --private never
    pushes into an existing public repo; a private source's copy is private; a relative
    licence link points at the source's file; an invalid destination id fails before the
    repair; a failed push says where the saved model is."""
    tokens = hub_server.tokens
    card = "---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE\n---\n# ResNet\n"
    sha = seed_timm(hub_server, tmp_path, readme=card)
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=tokens.other)
    hub_server.lose_answer("/commit/main", status=504)  # the PR commit lands, its answer does not
    code, out, err = cli(["repair", "alice/resnet", "--pr", *FAST], capsys)
    assert code == 0, err
    assert len(hub_server.discussions("alice/resnet")) == 1 and hub_server.head("alice/resnet") == sha
    assert [r.status for r in hub_server.requests if "/commit/main" in r.path] == [504]  # retried via the PR lookup

    use_hub(monkeypatch, hub_server, tmp_path / "cache-alice", token=tokens.write)
    code, _, err = cli(["repair", "alice/resnet", "--push", "-q", *FAST], capsys)
    assert code == 0, err
    pushed = hub_server.files("alice/resnet-otbr")
    assert f"license_link: {hub_server.endpoint}/alice/resnet/blob/{sha}/LICENSE" in pushed["README.md"].decode()
    before = hub_server.head("alice/resnet-otbr")
    code, _, err = cli(["repair", "alice/resnet", "--push", "--private", "-q", *FAST], capsys)
    assert code == 2 and "exists and is public" in err and hub_server.head("alice/resnet-otbr") == before

    seed_timm(hub_server, tmp_path, "alice/secret", private=True)
    code, _, err = cli(["repair", "alice/secret", "--push", "-q", *FAST], capsys)
    assert code == 0, err
    assert hub_server.repo("alice/secret-otbr").private

    t = len(hub_server.requests)
    code, _, err = cli(["repair", "alice/resnet", "--push", "--repo-id", "alice/x@main", *FAST], capsys)
    assert code == 2 and "not a valid Hub repo id" in err
    assert not any("/resolve/" in r.path for r in hub_server.requests[t:])  # refused before downloading

    hub_server.rate_limit(50, retry_after=0, path_contains="/commit/")  # the upload keeps failing
    out_dir = tmp_path / "saved"
    code, _, err = cli(["repair", "alice/resnet", "--push", "--repo-id", "alice/new-one", "-o", str(out_dir), "-q", *FAST],
                       capsys)
    assert code == 2 and "rate limiting" in err and f"saved in {out_dir}" in err, err
    assert (out_dir / "model.safetensors").is_file()


def test_repo_ids_take_the_hubs_spelling(hub_server: HubServer, tmp_path: Path, monkeypatch, capsys) -> None:
    """The Hub matches ids in any letter case; the cache, the card and the default push name
    use the repo's own spelling, and a later offline run finds the cache under any case."""
    from otbr_hub.cli import _source_key
    from otbr_hub.scan import ScanSettings, scan_target
    from otbr_hub.detect import DetectSettings

    sha = seed_timm(hub_server, tmp_path, repo="Alice/ResNet")
    use_hub(monkeypatch, hub_server, tmp_path / "cache", token=hub_server.tokens.write)
    code, out, err = cli(["repair", "alice/resnet", "--push", *FAST], capsys)
    assert code == 0, err
    assert f"pushed to {hub_server.endpoint}/alice/ResNet-otbr" in out
    card = ModelCard(hub_server.files("alice/ResNet-otbr")["README.md"].decode())
    assert card.data.base_model == "Alice/ResNet"
    assert json.loads(hub_server.files("alice/ResNet-otbr")["otbr_report.json"])["source"] == "Alice/ResNet"
    assert sorted(p.name for p in (tmp_path / "cache").glob("models--*")) == ["models--Alice--ResNet"]

    settings = ScanSettings(detector=DetectSettings(steps=2, inputs_per_class=2, device="cpu"), cache_dir=str(tmp_path / "cache"))
    assert scan_target("ALICE/resnet", settings=settings).target == "Alice/ResNet"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub_server.requests)
    loaded = load_source("ALICE/resnet")
    assert (loaded.source, loaded.revision) == ("Alice/ResNet", sha)
    report = scan_target("alice/RESNET", settings=settings)
    assert (report.target, report.revision) == ("Alice/ResNet", sha), report.error
    assert len(hub_server.requests) == seen  # nothing went over the network

    assert _source_key("hf-hub:Alice/ResNet@v1") == _source_key("alice/resnet@v1") != _source_key("alice/resnet@V1")
