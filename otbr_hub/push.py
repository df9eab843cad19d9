"""Publish a repaired model: to a new repo (``--push``) or as a pull request on the source (``--pr``).

Three rules shape this module:

* Nothing is uploaded that was not reloaded from disk and checked first: the exact files
  that go up are loaded back with :func:`~otbr_hub.load.load_folder`, compared tensor by
  tensor with the source and the repaired model, and run once.
* One commit per publication, made against the branch head that was read
  (``parent_commit``), so a concurrent change makes the Hub refuse (412) instead of
  silently mixing two versions.
* The source repo is only ever offered a pull request, never written to directly, and
  only one pull request per source commit.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .card import public_report, render_card, render_pr_description, source_label
from .errors import HubError, OtbrError, UnsupportedModelError, UsageError
from .fetch import HubContext, call_hub, hub_context, hub_error, is_hub_source, is_repo_id, parse_source, source_readme
from .load import load_folder, read_json_object
from .save import plain_weights, save_model
from .verify import compare_state_dicts, verify

log = logging.getLogger("otbr_hub")

REPORT_FILE = "otbr_report.json"
# Top-level files that hold weights; stale ones are deleted so loaders cannot pick an old copy.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
# Inputs synthesised to check the reloaded model; the repair already checked more.
_MAX_CHECK_SAMPLES = 64


def is_weight_file(path: str) -> bool:
    """``model.safetensors``, shards, indexes and ``pytorch_model*.bin`` at the repo root."""
    return "/" not in path and bool(_WEIGHT_FILE.match(path))


def default_repo_name(source: str) -> str:
    """``<source name>-otbr``: the last part of a repo id or folder, made Hub-safe."""
    name = source.removeprefix("hf-hub:").split("@", 1)[0].rstrip("/").split("/")[-1] or "model"
    name = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return f"{name}-otbr"[:96]


# --------------------------------------------------------------------------- checks


def check_can_publish(token: str | None = None, endpoint: str | None = None) -> str:
    """The account name a publication would use; fails early without a usable write token.

    Meant to run before a long repair so a missing token costs seconds, not the whole run.
    """
    return _whoami(hub_context(token, endpoint))[0]


def check_publication(sources: str | Sequence[str], *, repo_id: str | None = None, pr: bool = False,
                      private: bool = False, token: str | None = None, endpoint: str | None = None) -> str:
    """Everything about publishing ``sources`` (one or several) that can be checked before the
    repair: the options fit together, a pull request has a Hub repo to go to, and each push
    has a destination that is not its source and that the token may write to. Returns the
    account name; raises :class:`UsageError` or :class:`HubError` with the reason."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    hub = {s: is_hub_source(s) for s in sources}
    _check_options(repo_id=repo_id, pr=pr, private=private)
    if pr:
        for s in sources:
            if not hub[s]:
                raise UsageError(f"--pr needs a source on the Hub (user/model); {s} is a local folder with no repo to propose to")
    user, namespaces = _whoami(hub_context(token, endpoint))
    if not pr:
        for s in sources:
            source_repo = parse_source(s).repo_id if hub[s] else None
            _check_destination(_destination_name(s, repo_id, user), source_repo, namespaces)
    return user


def check_result_publishable(loaded: Any, *, repo_id: Any = None, pr: bool = False, private: bool = False,
                             token: Any = None) -> None:
    """The checks of :func:`publish` that need neither the Hub nor the repaired model, so that
    ``repair(model, push=True)`` fails before the repair, not after it."""
    if repo_id is not None and (not isinstance(repo_id, str) or not repo_id.strip()):
        raise UsageError(f"repo_id must be 'name' or 'namespace/name', got {repo_id!r}")
    if token is not None and not isinstance(token, (str, bool)):
        raise UsageError(f"token must be a string (or True/False), got {type(token).__name__}")
    _check_options(repo_id=repo_id, pr=pr, private=private)
    if getattr(loaded, "library", None) not in ("timm", "transformers"):
        raise UnsupportedModelError("only timm and transformers models can be published (a plain torch module has no config)")
    if pr and not (loaded.revision and is_repo_id(str(loaded.source))):
        raise UsageError(f"a pull request needs a model loaded from the Hub (user/model); this one is {loaded.source}")


def _check_options(*, repo_id: Any, pr: bool, private: bool) -> None:
    """The publication options that exclude each other (CLI and Python API alike)."""
    if pr and repo_id:
        raise UsageError("--repo-id names the --push destination; --pr always proposes the change to the source repo")
    if pr and private:
        raise UsageError("--private applies to --push (a new repo); a pull request has the source repo's visibility")


def _whoami(ctx: HubContext) -> tuple[str, set[str]]:
    """Account name and the namespaces it may write to; refuses read-only tokens."""
    from huggingface_hub import get_token

    if ctx.offline:
        raise HubError("cannot publish in offline mode (HF_HUB_OFFLINE=1); unset it to upload")
    if not ctx.token and not get_token():
        raise HubError("publishing needs a Hub token with write access: set HF_TOKEN or run `hf auth login`")
    api = ctx.api()
    me = call_hub(api.whoami, ctx, repo_id="your account", writing=True)
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError("no write permission: the token has the 'read' role; use a token with the 'write' role (HF_TOKEN)")
    name = str(me["name"])
    return name, {name, *(str(o.get("name")) for o in me.get("orgs") or [] if o.get("name"))}


def _weights_match(repaired: torch.nn.Module, reloaded: torch.nn.Module, stored: torch.dtype) -> list[str]:
    """Tensors that differ between the repaired model and what was written (in the stored dtype)."""
    a, b = repaired.state_dict(), reloaded.state_dict()
    bad = []
    for key in sorted(set(a) & set(b)):
        x, y = a[key].detach().cpu(), b[key].detach().cpu()
        if x.is_floating_point():
            x, y = x.to(stored), y.to(stored)
        if x.shape != y.shape or not torch.equal(x, y):
            bad.append(key)
    return bad


def verify_saved(result: Any, folder: Path, *, samples: int = _MAX_CHECK_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Reload ``folder`` as a user would and check it before anything is uploaded.

    Keys and shapes must match the source, the stored dtype must be the source's, every
    tensor must equal the repaired model's, and the reloaded model must run. Agreement
    with the source on synthesised inputs is recorded for the card. Raises
    :class:`OtbrError` when any check fails.
    """
    source = result.source
    try:
        reloaded = load_folder(folder)
    except OtbrError as err:
        raise OtbrError(f"refusing to publish: the saved model cannot be reloaded ({err})") from None
    # saved weights are plain tensors (save.plain_weights): compare with the source's the same way
    problems = compare_state_dicts(plain_weights(source.model).state_dict(), reloaded.model.state_dict(), check_dtype=False)
    if reloaded.dtype != source.dtype:
        problems.append(f"weights stored as {reloaded.dtype}, the source uses {source.dtype}")
    if not problems:
        differ = _weights_match(plain_weights(result.model), reloaded.model, reloaded.dtype)
        if differ:
            problems.append(f"saved tensors differ from the repaired model: {', '.join(differ[:3])}")
    if not problems:  # running a model whose files are wrong would only add noise
        device = next(reloaded.model.parameters()).device
        original = copy.deepcopy(plain_weights(source.model)).float().to(device).eval()
        check = verify(original, reloaded.model.eval(), source.spec, samples=samples, seed=seed)
        problems += check.problems
    if problems:
        raise OtbrError(f"refusing to publish: the saved model failed verification: {'; '.join(problems)}")
    return {
        "ok": True,
        "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
        "keys_shapes_dtypes_match_source": True,
        "weights_equal_repaired_model": True,
        "agreement_with_source": check.agreement,
        "samples": samples,
    }


# --------------------------------------------------------------------------- commits


def _operations(folder: Path, extra: dict[str, bytes], *, only: Callable[[str], bool] = lambda _: True) -> list[Any]:
    """Adds for the folder's files (those ``only`` accepts) plus ``extra`` contents; fresh objects each call."""
    from huggingface_hub import CommitOperationAdd

    ops = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in extra and not rel.startswith(".") and only(rel):
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    return ops


def _stale_weights(existing: list[str], new: list[Any]) -> list[Any]:
    """Deletions for weight files the new commit does not replace (old shards, a ``.bin``)."""
    from huggingface_hub import CommitOperationDelete

    added = {op.path_in_repo for op in new}
    return [CommitOperationDelete(path_in_repo=f) for f in existing if is_weight_file(f) and f not in added]


def _report_bytes(report: dict[str, Any], ctx: HubContext) -> bytes:
    return ctx.redact(json.dumps(public_report(report), indent=2, default=str)).encode()


def _destination_name(source: str, repo_id: str | None, user: str) -> str:
    """``repo_id`` or ``<source name>-otbr``, under ``user`` when it names no namespace."""
    dest = repo_id or default_repo_name(source)
    return dest if "/" in dest else f"{user}/{dest}"


def _check_destination(dest: str, source_repo: str | None, namespaces: set[str]) -> None:
    """A push never goes to the source repo and only to a namespace the token can write to;
    Hub names compare without case (``User/Model`` is ``user/model``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(dest)
    except HFValidationError as err:
        raise UsageError(f"{dest} is not a valid Hub repo id for the destination ({str(err).splitlines()[0]})") from None
    if source_repo and dest.lower() == source_repo.lower():
        raise UsageError(f"{dest} is the source repo; otbr-hub never writes to it directly (use --pr to propose the change)")
    if dest.split("/", 1)[0].lower() not in {n.lower() for n in namespaces}:
        raise HubError(f"no write permission on {dest}: this token can write to {', '.join(sorted(namespaces))} only")


def _destination(result: Any, repo_id: str | None, user: str, namespaces: set[str]) -> str:
    """Where ``--push`` writes: ``repo_id`` or ``<user>/<source name>-otbr``, checked up front."""
    source = result.source
    dest = _destination_name(source.source, repo_id, user)
    _check_destination(dest, source.source if source.revision else None, namespaces)
    return dest


def _push(ctx: HubContext, result: Any, report: dict[str, Any], folder: Path, *, dest: str, private: bool | str,
          parent_commit: str | None) -> str:
    api = ctx.api()
    source = result.source
    if private:  # create_repo(exist_ok=True) leaves an existing repo's visibility as it is
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            current = api.model_info(dest)
        except RepositoryNotFoundError:
            current = None
        except Exception as err:
            raise hub_error(err, ctx, repo_id=dest) from None
        if current is not None and not current.private:
            why = "--private was given" if private is True else f"the source {source.source} is private"
            raise UsageError(f"{dest} exists and is public, but {why}: otbr-hub does not change an existing repo's "
                             "visibility; make it private on the Hub first, or push to a new --repo-id")
    url = call_hub(lambda: api.create_repo(dest, private=bool(private), exist_ok=True), ctx, repo_id=dest, writing=True)
    head = parent_commit or call_hub(lambda: api.model_info(dest).sha, ctx, repo_id=dest)
    existing = call_hub(lambda: api.list_repo_files(dest, revision=head), ctx, repo_id=dest, revision=head)
    readme = render_card(report, repo_id=dest, source_readme=source_readme(source), base_url=ctx.base_url, redact=ctx.redact)
    extra = {"README.md": readme.encode(), REPORT_FILE: _report_bytes(report, ctx)}

    def commit() -> Any:
        ops = _operations(folder, extra)  # fresh objects: an attempt consumes them
        return api.create_commit(
            dest, ops + _stale_weights(existing, ops), revision="main", parent_commit=head,
            commit_message=f"Add {source_label(report)} repaired with otbr-hub",
            commit_description=(f"Backdoor repair of {source_label(report)}"
                                + (f" at {source.revision}" if source.revision else "") + "; details in README.md and otbr_report.json."),
        )

    info = call_hub(commit, ctx, repo_id=dest, revision="main", writing=True)
    log.info("pushed %s (commit %s)", dest, getattr(info, "oid", "?"))
    return str(url)


def _existing_pr(ctx: HubContext, repo: str, sha: str, marker: str) -> str | None:
    """URL of an open otbr-hub pull request for this source commit, if one exists."""
    api = ctx.api()
    prs = call_hub(lambda: list(api.get_repo_discussions(repo, discussion_type="pull_request", discussion_status="open")),
                   ctx, repo_id=repo)
    for pr in prs:
        if sha[:12] not in pr.title:
            continue
        details = call_hub(lambda: api.get_discussion_details(repo, pr.num), ctx, repo_id=repo)
        if any(marker in (getattr(event, "content", "") or "") for event in details.events):
            return pr.url
    return None


def _branch_at(ctx: HubContext, repo: str, sha: str) -> str:
    """The branch whose head is ``sha`` (``main`` preferred): pull requests target a branch head."""
    refs = call_hub(lambda: ctx.api().list_repo_refs(repo), ctx, repo_id=repo)
    branches = [b.name for b in refs.branches if b.target_commit == sha]
    if not branches:
        raise HubError(f"{repo} has moved on: commit {sha[:12]} is not the head of any branch any more; "
                       "repair the current revision to open a pull request")
    return "main" if "main" in branches else sorted(branches)[0]


def _pr_marker(sha: str) -> str:
    return f"otbr-hub-source-commit: {sha}"


def _pr_target(ctx: HubContext, result: Any) -> tuple[str | None, str | None]:
    """``(existing PR url, None)`` or ``(None, branch)``: checked before any verification work."""
    source = result.source
    repo, sha = source.source, source.revision
    if not sha or not is_repo_id(repo):
        raise UsageError("--pr needs a source on the Hub (user/model); a local folder has no repo to propose to")
    found = _existing_pr(ctx, repo, sha, _pr_marker(sha))
    if found:
        log.warning("a pull request for %s at %s is already open: %s (not opening another)", repo, sha[:12], found)
        return found, None
    return None, _branch_at(ctx, repo, sha)


def _bounded_config(result: Any, report: dict[str, Any]) -> bytes | None:
    """The source's own ``config.json`` with the activation bounds' entry set (``act_layer`` in
    timm's ``model_args``, transformers' ``hidden_act``), or None when no bounds were applied."""
    entry = (report.get("clipping") or {}).get("config") if (report.get("clipping") or {}).get("applied") else None
    source = result.source.folder
    if not entry or source is None or not (Path(source) / "config.json").is_file():
        return None
    cfg = read_json_object(Path(source) / "config.json")
    if result.source.library == "timm":
        cfg["model_args"] = {**(cfg.get("model_args") or {}), **entry}
    else:
        cfg.update(entry)
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _open_pr(ctx: HubContext, result: Any, report: dict[str, Any], folder: Path, *, branch: str) -> str:
    repo, sha = result.source.source, result.source.revision
    api = ctx.api()
    existing = call_hub(lambda: api.list_repo_files(repo, revision=sha), ctx, repo_id=repo, revision=sha)
    extra = {REPORT_FILE: _report_bytes(report, ctx)}
    # Only weights and the report: the owner's config, preprocessing and README stay theirs,
    # except the one entry the activation bounds need (without it the weights load unbounded).
    config = _bounded_config(result, report)
    if config is not None:
        extra["config.json"] = config
    planned = _operations(folder, extra, only=is_weight_file)
    removed = [op.path_in_repo for op in _stale_weights(existing, planned)]
    files = [op.path_in_repo for op in planned] + [f"{f} (removed)" for f in removed]
    description = render_pr_description(report, marker=_pr_marker(sha), files=files, redact=ctx.redact)

    tries = []

    def commit() -> Any:
        tries.append(1)
        if len(tries) > 1:  # a retry after a 5xx: the first attempt may have opened the PR after all
            found = _existing_pr(ctx, repo, sha, _pr_marker(sha))
            if found:
                log.info("the pull request from the previous attempt is open: %s", found)
                return types.SimpleNamespace(pr_url=found)
        ops = _operations(folder, extra, only=is_weight_file)
        return api.create_commit(
            repo, ops + _stale_weights(existing, ops), revision=branch, create_pr=True, parent_commit=sha,
            commit_message=f"Backdoor repair with otbr-hub (from {sha[:12]})", commit_description=description,
        )

    info = call_hub(commit, ctx, repo_id=repo, revision=branch, writing=True)
    if not getattr(info, "pr_url", None):
        raise HubError(f"no pull request opened on {repo}: the repaired files are identical to the source")
    return str(info.pr_url)


# --------------------------------------------------------------------------- entry points


def publish(result: Any, report_dict: dict[str, Any], *, repo_id: str | None = None, private: bool = False,
            pr: bool = False, folder: str | Path | None = None, token: str | None = None,
            endpoint: str | None = None, parent_commit: str | None = None) -> str:
    """Verify and upload a :class:`~otbr_hub.repair.RepairResult`; returns the repo or pull request URL.

    ``folder`` is a saved copy of the result (with ``otbr_report.json``), written to a
    temporary folder when not given. ``parent_commit`` is the destination head the caller
    last saw (default: read now); the commit fails if the branch moved past it.
    """
    if not (hasattr(result, "source") and hasattr(result, "model") and hasattr(result.source, "library")):
        raise UsageError(f"publish takes the RepairResult that repair() returns, got {type(result).__name__}")
    if not isinstance(report_dict, dict):
        raise UsageError(f"report must be a dict (RepairResult.report.to_dict()), got {type(report_dict).__name__}")
    check_result_publishable(result.source, repo_id=repo_id, pr=pr, private=private, token=token)
    ctx = hub_context(token, endpoint)
    user, namespaces = _whoami(ctx)
    # Cheap checks first: a refused destination should not cost a verification pass.
    if pr:
        found, branch = _pr_target(ctx, result)
        if found:
            return found
    else:
        dest = _destination(result, repo_id, user, namespaces)
    settings = report_dict.get("settings") or {}
    samples = min(int(settings.get("verify_samples") or _MAX_CHECK_SAMPLES), _MAX_CHECK_SAMPLES)
    with tempfile.TemporaryDirectory(prefix="otbr-publish-") as tmp:
        if folder is None:
            folder = save_model(result.source, result.model, Path(tmp) / "model", extra_files={REPORT_FILE: report_dict})
        folder = Path(folder)
        check = verify_saved(result, folder, samples=samples, seed=int(settings.get("seed") or 0))
        report = {**report_dict, "publish_verification": check}
        if pr:
            return _open_pr(ctx, result, report, folder, branch=branch)
        if not private and _source_is_private(ctx, result.source):
            log.warning("%s is private, so %s is created private too", result.source.source, dest)
            private = "inherited"  # truthy for create_repo; the refusal above names the reason
        return _push(ctx, result, report, folder, dest=dest, private=private, parent_commit=parent_commit)


def _source_is_private(ctx: HubContext, source: Any) -> bool:
    """Whether a Hub source is private: its repaired copy must not become public by default."""
    if not (source.revision and is_repo_id(str(source.source))):
        return False
    info = call_hub(lambda: ctx.api().model_info(source.source, revision=source.revision), ctx,
                    repo_id=source.source, revision=source.revision)
    return bool(getattr(info, "private", False))


def push_to_hub(result: Any, repo_id: str | None = None, *, private: bool = False, token: str | None = None,
                endpoint: str | None = None, report: dict[str, Any] | None = None,
                parent_commit: str | None = None) -> str:
    """Python-API publication of a repair result to ``repo_id`` (default ``<you>/<source>-otbr``),
    with the same checks, card and single commit as ``otbr-hub repair --push``."""
    if report is None:
        if not hasattr(getattr(result, "report", None), "to_dict"):
            raise UsageError(f"push_to_hub takes the RepairResult that repair() returns, got {type(result).__name__}")
        report = result.report.to_dict()
    return publish(result, report, repo_id=repo_id,
                   private=private, token=token, endpoint=endpoint, parent_commit=parent_commit)
