"""Sources on the Hugging Face Hub: parse ids, preflight through the API, download.

A repo id is checked with one ``model_info`` call before anything heavy is fetched, so a
typo, a gated repo or a text model fails in a second with a sentence the user can act on
instead of after a multi-gigabyte download. Only the files the loaders need are
downloaded, all pinned to the commit sha the preflight resolved, so the report names
exactly the weights that were repaired.

Endpoint, token, cache and offline mode are read from the environment *at call time*
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE``/``HF_HOME``, ``HF_HUB_OFFLINE``) as a
fallback for explicit arguments: ``huggingface_hub`` itself reads most of them once, at
import, which is too early for programs (and tests) that set them later.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import HubError, OtbrError, UnsupportedModelError, UsageError
from .load import LoadedModel, config_library, load_folder, read_json_object

log = logging.getLogger("otbr_hub")

T = TypeVar("T")

_REPO_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[^\s@]+)?$")

# Waits between attempts when the Hub rate-limits or the network drops; the number of
# entries is the number of retries. Module-level so tests can shorten it.
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0)
# A Retry-After longer than this is not waited out: the user is told to come back later.
MAX_RETRY_AFTER = 60.0

# Files that describe preprocessing; fetched when the repo has them.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")
# Weight layouts in order of preference: safetensors first, pickles only as a last resort.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_repo_id(text: str) -> bool:
    """``user/model``, ``user/model@rev`` or ``hf-hub:user/model`` (not a filesystem path)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    return bool(_REPO_ID.match(text)) and "/" in text.split("@", 1)[0]


def is_hub_source(text: str) -> bool:
    """Whether a source names a Hub repo: it reads as a repo id and no local path has that name
    (a folder called ``user/model`` wins, as everywhere in otbr-hub)."""
    return is_repo_id(text) and not Path(text).expanduser().exists()


@dataclass(frozen=True)
class SourceRef:
    """A parsed Hub source: repo id, the revision asked for (None: default branch), and
    whether timm's ``hf-hub:`` prefix was used (which promises a timm repo)."""

    repo_id: str
    revision: str | None = None
    timm_prefix: bool = False


def parse_source(text: str) -> SourceRef:
    """Split ``[hf-hub:]user/model[@revision]``; revisions may contain ``/`` (``refs/pr/3``)."""
    if not is_repo_id(text):
        raise UsageError(f"'{text}' is neither a folder nor a Hub repo id like 'user/model[@revision]'")
    prefix = text.startswith("hf-hub:")
    body = text.removeprefix("hf-hub:")
    repo_id, _, revision = body.partition("@")
    return SourceRef(repo_id=repo_id, revision=revision or None, timm_prefix=prefix)


# --------------------------------------------------------------------------- settings


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubContext:
    """Where and as whom to talk to the Hub, resolved once per operation."""

    endpoint: str | None
    token: str | None
    cache_dir: str | None
    offline: bool
    secrets: tuple[str, ...] = ()
    """More strings never to show: the stored login's token (the client sends it when no token
    is given) and credentials written into the endpoint URL."""

    @property
    def base_url(self) -> str:
        """The endpoint as shown to people and written into cards: without ``user:password@``."""
        from urllib.parse import urlsplit, urlunsplit

        from huggingface_hub import constants

        url = (self.endpoint or constants.ENDPOINT).rstrip("/")
        parts = urlsplit(url)
        if parts.username or parts.password:
            url = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
        return url

    def api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def redact(self, text: str) -> str:
        """Remove the token (and :attr:`secrets`) from anything that may be shown, logged or uploaded."""
        for secret in (self.token if isinstance(self.token, str) else None, *self.secrets):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


def hub_context(token: str | None = None, endpoint: str | None = None, cache_dir: str | Path | None = None) -> HubContext:
    """Explicit arguments first, then the environment as it is now (not at import)."""
    from huggingface_hub import constants

    from urllib.parse import unquote, urlsplit

    from huggingface_hub import get_token

    env = os.environ
    cache = cache_dir or env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None)
    endpoint = endpoint or env.get("HF_ENDPOINT") or None
    secrets: list[str] = []
    try:
        stored = get_token()
    except Exception:  # an unreadable token file: nothing to hide then
        stored = None
    if stored:
        secrets.append(stored)
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.password:  # the user name stays: it is often a namespace, named in messages anyway
            secrets += [parts.password, unquote(parts.password)]
    return HubContext(
        endpoint=endpoint,
        token=(token or env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None),
        cache_dir=str(cache) if cache else None,
        offline=constants.HF_HUB_OFFLINE or _truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE")),
        secrets=tuple(dict.fromkeys(secrets)),
    )


# --------------------------------------------------------------------------- errors


def _chain(err: BaseException) -> list[BaseException]:
    """The error and everything it was raised from (huggingface_hub wraps a lot)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _http_error(err: BaseException) -> Any | None:
    """The first ``HfHubHTTPError`` with a response in the chain."""
    from huggingface_hub.errors import HfHubHTTPError

    for e in _chain(err):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            return e
    return None


def _status(err: BaseException) -> int | None:
    http = _http_error(err)
    return None if http is None else http.response.status_code


def _is_network(err: BaseException) -> bool:
    """A dropped or refused connection, a timeout: worth retrying."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in _chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)) and not isinstance(e, httpx2.ProxyError):
            return True
    return False


def _retry_after(err: BaseException) -> float | None:
    http = _http_error(err)
    if http is None:
        return None
    value = http.response.headers.get("Retry-After", "").strip()
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _server_message(err: BaseException) -> str:
    http = _http_error(err)
    msg = (getattr(http, "server_message", None) or "") if http is not None else ""
    if not msg:
        msg = str(err)
    return msg.strip().splitlines()[0] if msg.strip() else type(err).__name__


def is_retryable(err: BaseException) -> bool:
    """Rate limits, server hiccups and network drops; never auth or "not found"."""
    status = _status(err)
    if status is not None:
        return status == 429 or status in (500, 502, 503, 504)
    return _is_network(err)


def hub_error(err: BaseException, ctx: HubContext, *, repo_id: str, revision: str | None = None, writing: bool = False,
              filename: str | None = None, attempts: int = 1) -> OtbrError:
    """Turn whatever the client raised into one line that says what to do next.

    ``filename`` names the file being downloaded (network failures then read as a broken
    download, not as an unreachable Hub); ``attempts`` is how many times it was tried.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, OtbrError):
        return err
    status = _status(err)
    server = _server_message(err)
    page = f"{ctx.base_url}/{repo_id}"
    kinds = _chain(err)
    if any(isinstance(e, OfflineModeIsEnabled) for e in kinds):
        msg = f"offline mode is on (HF_HUB_OFFLINE=1) and {repo_id} cannot be reached; unset it or use a cached model"
    elif status == 401 and _token_rejected(err, kinds):
        msg = "the Hub rejected the token (invalid or expired); check HF_TOKEN or log in again with `hf auth login`"
    elif any(isinstance(e, GatedRepoError) for e in kinds):
        if ctx.token:
            msg = f"{repo_id} is gated and this account has no access yet: request it on {page}, then run again"
        else:
            msg = f"{repo_id} is gated: request access on {page}, then set HF_TOKEN to a token of that account"
    elif any(isinstance(e, RepositoryNotFoundError) for e in kinds):
        if ctx.token:
            msg = f"repository {repo_id} not found on {ctx.base_url}, or this token's account cannot see it"
        else:
            msg = f"repository {repo_id} not found on {ctx.base_url} (if it is private, set HF_TOKEN to a token that can read it)"
    elif any(isinstance(e, RevisionNotFoundError) for e in kinds):
        msg = f"revision '{revision}' not found in {repo_id} (use a branch, tag, commit sha or refs/pr/N)"
    elif status == 412:
        msg = (f"{repo_id} changed while publishing (a commit landed on the branch since it was read); "
               "nothing was written, run again to publish on top of the new head")
    elif status == 403 or (writing and status == 401):
        if writing:
            msg = f"no write permission on {repo_id}: use a token with the 'write' role for that namespace (HF_TOKEN)"
        else:
            msg = f"access to {repo_id} was refused ({server})"
    elif status == 429:
        wait = _retry_after(err)
        hint = f" (the Hub asks to wait {wait:g} s)" if wait else ""
        msg = f"the Hub is rate limiting requests{hint}; wait a few minutes and try again"
    elif status is not None and status >= 500:
        msg = f"the Hub answered HTTP {status} for {repo_id}; it may be down, try again later"
    elif _is_network(err) and filename:
        kind = type(next(e for e in kinds if _is_network(e))).__name__
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        msg = (f"network failure while downloading {filename} from {repo_id} ({kind}{tries}); "
               "check the connection and run again (files already downloaded stay in the cache)")
    elif _is_network(err):
        listing = repo_id.startswith("the model list")  # a query has no cached answer to fall back on
        advice = ("check the connection (publishing needs the Hub)" if writing
                  else "check the connection (listing models needs the Hub; HF_HUB_OFFLINE cannot help)" if listing
                  else "check the connection, or set HF_HUB_OFFLINE=1 to use cached models")
        msg = f"cannot reach the Hub at {ctx.base_url} ({type(next(e for e in kinds if _is_network(e))).__name__}); {advice}"
    elif status is not None:
        msg = f"Hub request for {repo_id} failed with HTTP {status}: {server}"
    else:
        msg = f"Hub request for {repo_id} failed: {type(err).__name__}: {server}"
    return HubError(ctx.redact(msg))


def _token_rejected(err: BaseException, kinds: list[BaseException]) -> bool:
    """A 401 that means the token itself is bad, not a missing permission. ``whoami`` wraps the
    server's "Invalid credentials" in an error of its own ("Invalid user token."), so the
    whole chain is read."""
    texts = [_server_message(e) for e in kinds] + [str(e) for e in kinds]
    return any("invalid credentials" in t.lower() or "invalid user token" in t.lower() for t in texts)


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    """What the client raises for Hub and network trouble (programming errors stay tracebacks)."""
    import httpx2
    from huggingface_hub.errors import EntryNotFoundError

    return (OSError, ValueError, httpx2.HTTPError, EntryNotFoundError)


def call_hub(fn: Callable[[], T], ctx: HubContext, *, repo_id: str, revision: str | None = None, writing: bool = False,
             filename: str | None = None) -> T:
    """Run one Hub call, retrying rate limits and network drops with backoff.

    ``Retry-After`` is honoured when the Hub sends it (up to :data:`MAX_RETRY_AFTER`);
    otherwise :data:`RETRY_DELAYS` apply.

    Downloads: within one ``hf_hub_download`` call, huggingface_hub itself resumes a body
    that ended early with a ``Range`` request from the last whole 10 MiB chunk it wrote
    (up to 5 tries without progress). When that call still fails (those tries used up, or
    a connection reset, which it does not resume), the retry here starts the file again:
    huggingface_hub 2.x deletes its partial file, so there is nothing to resume across calls.
    """
    delays = list(RETRY_DELAYS)
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn()
        except _hub_exceptions() as err:
            def fail() -> OtbrError:
                return hub_error(err, ctx, repo_id=repo_id, revision=revision, writing=writing, filename=filename,
                                 attempts=attempts)

            if not delays or not is_retryable(err):
                raise fail() from None
            wait = _retry_after(err)
            if wait is not None and wait > MAX_RETRY_AFTER:
                raise fail() from None
            planned = delays.pop(0)
            delay = planned if wait is None else wait
            log.info("Hub request for %s failed (%s); retrying in %.0f s", repo_id, ctx.redact(_server_message(err)), delay)
            time.sleep(delay)


# --------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Preflight:
    """What the API said about the source, before any weights were downloaded."""

    repo_id: str
    sha: str
    library: str
    weights: str
    files: list[str]  # what to download besides shards
    available: frozenset[str]  # every file in the repo at ``sha``
    sizes: dict[str, int | None] = field(default_factory=dict)  # bytes per file, as the API reported them


def _library_hint(info: Any) -> str | None:
    tags = set(getattr(info, "tags", None) or [])
    name = getattr(info, "library_name", None)
    if name == "timm" or "timm" in tags:
        return "timm"
    if name == "transformers" or (name is None and "transformers" in tags):
        return "transformers"
    return name


def _check_config(repo_id: str, cfg: dict[str, Any], hint: str | None, ref: SourceRef, pipeline_tag: str | None) -> str:
    """Tell timm from transformers by the config itself and refuse what is not an image classifier."""
    library = config_library(cfg) or (hint if hint in ("timm", "transformers") else None)
    if library is None:
        raise UnsupportedModelError(f"{repo_id}: config.json is neither a timm nor a transformers config")
    if ref.timm_prefix and library != "timm":
        raise UnsupportedModelError(f"{repo_id} is a {library} model; 'hf-hub:' is only for timm repos, drop the prefix")
    if library == "timm":
        if int(cfg.get("num_classes", 1) or 0) <= 0:
            raise UnsupportedModelError(f"{repo_id} has no classifier head (num_classes=0); it is a feature extractor")
        return library
    if cfg.get("auto_map"):
        raise UnsupportedModelError(f"{repo_id} needs its own Python code (auto_map); only built-in architectures are supported")
    archs = cfg.get("architectures") or []
    if archs and not any(str(a).endswith("ForImageClassification") for a in archs):
        raise UnsupportedModelError(f"{repo_id} is a {', '.join(archs)}, not an image classifier (*ForImageClassification)")
    if pipeline_tag not in (None, "image-classification"):
        raise UnsupportedModelError(f"{repo_id} is tagged '{pipeline_tag}', not image-classification")
    return library


def _pick_weights(repo_id: str, files: set[str]) -> str:
    for name in WEIGHT_FILES:
        if name in files:
            return name
    raise UnsupportedModelError(
        f"{repo_id} has no loadable weights (model.safetensors, sharded safetensors or pytorch_model.bin)"
    )


# --------------------------------------------------------------------------- download


class _ResumeNotes(logging.Filter):
    """huggingface_hub warns on stderr, in two lines, each time it resumes or retries a
    broken download. Those notes go to otbr-hub's log instead (one line, shown with -v),
    so a resumed download is quiet and a failed one ends in a single error line."""

    def __init__(self, ctx: HubContext) -> None:
        super().__init__()
        self.ctx = ctx

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Error while downloading from"):
            return True
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        log.info("%s (%s)", self.ctx.redact(lines[0]), lines[-1] if len(lines) > 1 else "retrying")
        return False


def _download(ctx: HubContext, repo_id: str, sha: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    def get() -> str:
        return hf_hub_download(repo_id, filename, revision=sha, cache_dir=ctx.cache_dir, token=ctx.token,
                               endpoint=ctx.endpoint)

    notes = _ResumeNotes(ctx)
    hf_log = logging.getLogger("huggingface_hub.file_download")
    hf_log.addFilter(notes)
    try:
        return Path(call_hub(get, ctx, repo_id=repo_id, revision=sha, filename=filename))
    finally:
        hf_log.removeFilter(notes)


def preflight(ref: SourceRef, ctx: HubContext) -> tuple[Preflight, Path]:
    """Check the repo through the API and fetch its config; returns the snapshot folder."""
    from huggingface_hub.constants import DEFAULT_REVISION

    api = ctx.api()

    def checked(revision: str | None) -> tuple[Any, str | None, str]:
        info = call_hub(lambda: api.model_info(ref.repo_id, revision=revision, files_metadata=True), ctx,
                        repo_id=ref.repo_id, revision=revision)
        siblings = {s.rfilename for s in (info.siblings or [])}
        if "config.json" not in siblings:
            raise UnsupportedModelError(f"{ref.repo_id} has no config.json, so it is not a timm or transformers model")
        hint = _library_hint(info)
        if hint not in (None, "timm", "transformers"):
            raise UnsupportedModelError(f"{ref.repo_id} is a '{hint}' model; only timm and transformers are supported")
        return info, hint, _pick_weights(ref.repo_id, siblings)

    info, hint, weights = checked(ref.revision)
    repo_id = _hub_spelling(ref.repo_id, info)
    # Gated repos fail here, before any weights. Fetching by the revision *name* records
    # name -> sha in the cache, which offline mode needs to find this snapshot later.
    config_path = _download(ctx, repo_id, ref.revision or DEFAULT_REVISION, "config.json")
    if config_path.parent.name != info.sha:
        # The branch moved between the two calls, and the cache's name -> sha record now names
        # the new commit. Check and download that commit, so the record and the snapshot agree
        # (fetching the old one would leave offline mode a record pointing at missing files).
        info, hint, weights = checked(config_path.parent.name)
    siblings = {s.rfilename for s in (info.siblings or [])}
    library = _check_config(repo_id, read_json_object(config_path, f"{repo_id}: config.json"), hint, ref, info.pipeline_tag)
    files = ["config.json", *(n for n in PROCESSOR_FILES if n in siblings), weights]
    if "README.md" in siblings:
        files.append("README.md")  # kept in the repaired model's card
    sizes = {sib.rfilename: getattr(sib, "size", None) for sib in (info.siblings or [])}
    return Preflight(repo_id, info.sha, library, weights, files, frozenset(siblings), sizes), config_path.parent


def _hub_spelling(typed: str, info: Any) -> str:
    """The repo id as the Hub spells it. The Hub matches ids in any letter case, but the cache,
    the card's ``base_model`` and the default push name should all use the repo's own name."""
    canonical = getattr(info, "id", None)
    if isinstance(canonical, str) and canonical.lower() == typed.lower() and canonical != typed:
        log.info("%s is spelt %s on the Hub; using that", typed, canonical)
        return canonical
    return typed


def _shards(repo_id: str, index_path: Path, available: frozenset[str]) -> list[str]:
    index = read_json_object(index_path, f"{repo_id}: {index_path.name}")
    shards = sorted(set((index.get("weight_map") or {}).values()))
    if not shards:
        raise UnsupportedModelError(f"{repo_id}: {index_path.name} lists no shards")
    missing = [s for s in shards if s not in available]
    if missing:
        raise UnsupportedModelError(f"{repo_id}: {index_path.name} lists shards that are not in the repo: {', '.join(missing[:3])}")
    return shards


def cached_snapshot(ref: SourceRef, ctx: HubContext) -> tuple[Path, str]:
    """Offline mode: the cached snapshot of ``ref`` (config and weights) and the repo id it
    is cached under (the one given, or the Hub's own spelling when that differs in letter
    case: an online run caches the repo under the Hub's spelling, see :func:`preflight`),
    or a clear error when it was never downloaded."""
    from huggingface_hub import snapshot_download

    from huggingface_hub.constants import DEFAULT_REVISION

    revision = ref.revision or DEFAULT_REVISION
    missing = HubError(f"offline mode is on (HF_HUB_OFFLINE=1) and {ref.repo_id}@{revision} is not in the cache "
                       f"({ctx.cache_dir or 'default cache'}); run once online first, or unset HF_HUB_OFFLINE")
    for attempt in range(2):  # the spelling given, then (only if that misses) one the cache holds
        repo_id = ref.repo_id if attempt == 0 else _cached_spelling(ref.repo_id, ctx)
        if repo_id is None:
            continue
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=ctx.cache_dir, local_files_only=True))
        except Exception:
            continue
        if (folder / "config.json").is_file() and any((folder / n).is_file() for n in WEIGHT_FILES):
            return folder, repo_id
    raise missing


def _cached_spelling(repo_id: str, ctx: HubContext) -> str | None:
    """Another letter case under which the cache holds ``repo_id``, if any."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(ctx.cache_dir)
    except Exception:  # no cache folder yet, or one the scanner cannot read
        return None
    return next((r.repo_id for r in cache.repos
                 if r.repo_type == "model" and r.repo_id != repo_id and r.repo_id.lower() == repo_id.lower()), None)


def _load_offline(ref: SourceRef, ctx: HubContext) -> LoadedModel:
    """Offline mode: only the cache; a clear error when the model was never downloaded."""
    folder, repo_id = cached_snapshot(ref, ctx)
    return load_folder(folder, source=repo_id, revision=folder.name)


def load_source(text: str, *, token: str | None = None, endpoint: str | None = None,
                cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a local folder or a Hub model ``[hf-hub:]user/model[@revision]``.

    The result's ``source`` is the repo id and ``revision`` the commit sha that was
    actually downloaded (a branch or tag is resolved once, up front, and every file is
    fetched at that sha so a push in the meantime cannot mix two versions).
    """
    if Path(text).expanduser().exists():
        return load_folder(Path(text).expanduser())
    ref = parse_source(text)
    ctx = hub_context(token, endpoint, cache_dir)
    if ctx.offline:
        return _load_offline(ref, ctx)
    pre, folder = preflight(ref, ctx)
    for name in pre.files:
        if name != "config.json":
            _download(ctx, pre.repo_id, pre.sha, name)
    if pre.weights.endswith(".index.json"):
        for shard in _shards(pre.repo_id, folder / pre.weights, pre.available):
            _download(ctx, pre.repo_id, pre.sha, shard)
    log.info("downloaded %s at %s (%s)", pre.repo_id, pre.sha[:12], pre.library)
    return load_folder(folder, source=pre.repo_id, revision=pre.sha)


def source_readme(loaded: LoadedModel) -> str | None:
    """The source's own README, when it came with one (Hub download or local folder)."""
    if loaded.folder is None:
        return None
    path = loaded.folder / "README.md"
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
