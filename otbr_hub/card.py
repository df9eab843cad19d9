"""Model cards for repaired models, rendered from the Jinja templates in ``cards/``.

A card has to let a stranger judge the model without running anything: what was changed
and why, with which settings, how it was checked, what was *not* measured, and the exact
command to redo it. The report dictionary (``otbr_report.json``) is the only input, so
the card can never claim more than the run recorded. The source's own card is kept, in a
clearly marked section, because its licence terms, intended use and training details
still apply to the repaired weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from . import __version__

def _cards_dir() -> Path:
    """The templates: ``cards/`` at the top of the repository, which an installed wheel
    carries as ``otbr_hub/cards`` (see pyproject.toml)."""
    installed = Path(__file__).resolve().parent / "cards"
    return installed if (installed / "repaired_model.md").is_file() else Path(__file__).resolve().parent.parent / "cards"


CARDS_DIR = _cards_dir()
MODEL_TEMPLATE = CARDS_DIR / "repaired_model.md"
PR_TEMPLATE = CARDS_DIR / "pull_request.md"
DEFAULT_BASE_URL = "https://huggingface.co"

# The Hub knows four relations: adapter, merge, quantized, finetune. The repaired model keeps
# the base architecture and changes its weights (unlearning-guided pruning, then an optimal-
# transport fusion of the model with its own pruned copy). It is not an adapter and not a
# quantisation; "merge" on the Hub means combining *different* models. "finetune" -- new weights
# derived from a single base -- is the closest honest label.
BASE_MODEL_RELATION = "finetune"
TAGS = ("otbr", "backdoor-defense", "image-classification")

_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_FENCE = re.compile(r"^\s*(```|~~~)")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """YAML metadata (empty when missing or broken) and the body of a README."""
    match = _FRONT_MATTER.match(text)
    if match is None:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        data = {}
    return (data if isinstance(data, dict) else {}), text[match.end():]


def _demote_headings(body: str) -> str:
    """Push the original card's headings one level down so they nest under ours."""
    out, fenced = [], False
    for line in body.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,5}\s", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out).strip()


def license_fields(source_readme: str | None, link_base: str | None = None) -> dict[str, str]:
    """The source's licence metadata, copied only when the source states one. A relative
    ``license_link`` (``LICENSE``, a file of the source repo, which the repaired copy does not
    carry) is made absolute under ``link_base``, the source's files at the repaired commit."""
    meta, _ = split_front_matter(source_readme or "")
    if not meta.get("license"):
        return {}
    out = {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
    link = out.get("license_link")
    if link and link_base and "://" not in link and not link.startswith(("#", "mailto:")):
        out["license_link"] = f"{link_base.rstrip('/')}/{link.lstrip('./')}"
    return out


def is_hub_source(report: dict[str, Any]) -> bool:
    """Whether the report's source is a Hub repo (a commit sha was resolved for it)."""
    from .fetch import is_repo_id

    return bool(report.get("revision")) and is_repo_id(str(report.get("source", "")))


def public_command(command: str | None) -> str | None:
    """The command for a public card: absolute or home-relative paths (the source folder, an
    output or dataset folder) shortened to their last component, since a card on the Hub is
    public and the machine's directory layout is not. Hub ids and flags stay as they were."""
    if not command:
        return command
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    def short(word: str) -> str:
        flag, eq, value = word.partition("=")
        if eq and flag.startswith("--") and value.startswith(("/", "~")):  # --eval-dataset=/data/x
            return f"{flag}={Path(value).name or value}"
        return Path(word).name or word if word.startswith(("/", "~")) else word

    return shlex.join([short(w) for w in words])


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The report as it goes to the Hub: a local source folder by its name and the command
    with its paths shortened, as on the card (the machine's directory layout is not public)."""
    out = dict(report)
    if not is_hub_source(report):
        out["source"] = source_label(report)
    if out.get("command"):
        out["command"] = public_command(str(out["command"]))
    return out


def source_label(report: dict[str, Any]) -> str:
    """How the card names the source; a local path is reduced to its folder name."""
    source = str(report.get("source", "model"))
    if is_hub_source(report):
        return source
    return Path(source).name or source


def card_data(report: dict[str, Any], *, model_name: str, source_readme: str | None = None,
              base_url: str = DEFAULT_BASE_URL) -> Any:
    """Card metadata: base model, relation, licence (if any), tags, task, library, results."""
    from huggingface_hub import EvalResult, ModelCardData

    library = report.get("library")
    meta: dict[str, Any] = {
        "library_name": library if library in ("timm", "transformers") else None,
        "pipeline_tag": "image-classification",
        "tags": [*TAGS, *([library] if library in ("timm", "transformers") else [])],
        **license_fields(source_readme, link_base=(
            f"{base_url.rstrip('/')}/{report['source']}/blob/{report['revision']}" if is_hub_source(report) else None)),
    }
    if is_hub_source(report):
        meta.update(base_model=report["source"], base_model_relation=BASE_MODEL_RELATION)
    results = []
    ev = report.get("evaluation")
    if ev and ev.get("after"):
        # model-index describes *this* model, so only the after-repair numbers go there;
        # the source's numbers are in the card's table, where "before" cannot be misread.
        dataset = str(ev.get("dataset") or "evaluation set")
        common = {"task_type": "image-classification", "dataset_type": dataset, "dataset_name": dataset}
        if ev.get("split"):
            common["dataset_split"] = str(ev["split"])
        after = ev["after"]
        if _finite(after.get("acc")):
            results.append(EvalResult(**common, metric_type="accuracy", metric_name="ACC (clean accuracy, %)",
                                      metric_value=round(float(after["acc"]), 4)))
        if _finite(after.get("asr")):
            results.append(EvalResult(**common, metric_type="attack_success_rate",
                                      metric_name="ASR (attack success rate, %)", metric_value=round(float(after["asr"]), 4)))
    if results:
        meta.update(model_name=model_name, eval_results=results)
    return ModelCardData(**{k: v for k, v in meta.items() if v is not None})


def _finite(value: Any) -> bool:
    """A number the Hub's model-index accepts (not None, NaN or infinite)."""
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _scan_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for label, key in (("before repair", "scan_before"), ("after repair", "scan_after")):
        scan = report.get(key)
        if not scan:
            continue
        rows.append({
            "when": label,
            "verdict": str(scan.get("verdict", "-")),
            "p_value": _num(scan.get("p_value"), "{:.3g}"),
            "target": _num(scan.get("suspected_target"), "{}"),
            "decided_by": str(scan.get("decided_by") or scan.get("method") or "-"),
        })
    return rows


def _publish_check(check: dict[str, Any] | None) -> dict[str, str] | None:
    if not check:
        return None
    return {"agreement": _num(check.get("agreement_with_source")), "samples": _num(check.get("samples"), "{}")}


def _trigger_text(trigger: Any) -> str:
    """The trigger as the spec string ``--trigger`` takes (``badnets:target=3,size=3``)."""
    if trigger is None:
        return "-"
    try:
        from .triggers import parse_trigger

        return parse_trigger(trigger).spec()
    except Exception:  # an older or foreign report: show what it holds
        return json.dumps(trigger, sort_keys=True)


def _template_values(report: dict[str, Any], *, repo_id: str | None, source_readme: str | None,
                     base_url: str = DEFAULT_BASE_URL) -> dict[str, Any]:
    """Everything the template shows, formatted here so the template stays readable."""
    settings = report.get("settings") or {}
    unlearning = report.get("unlearning") or {}
    ev = report.get("evaluation")
    pruned = sorted(((n, int(c)) for n, c in (report.get("pruned_per_layer") or {}).items() if c), key=lambda x: -x[1])
    nwc = report.get("nwc") or {}
    original = None
    if source_readme and source_readme.strip():
        _, body = split_front_matter(source_readme)
        original = _demote_headings(body) or None
    library = report.get("library")
    return {
        "repo_id": repo_id,
        "base_url": base_url.rstrip("/"),
        "library": library,
        "source": source_label(report),
        "hub_source": is_hub_source(report),
        "memory_source": str(report.get("source")) == "<in-memory>",  # otbr_hub.load.IN_MEMORY (kept free of torch here)
        "revision": report.get("revision"),
        "version": report.get("otbr_hub_version") or __version__,
        "command": public_command(report.get("command")),
        "prune_ratio": _num(report.get("prune_ratio"), "{:g}"),
        "ratio_reason": report.get("ratio_reason") or "-",
        "candidates": [
            {"ratio": _num(c.get("ratio"), "{:g}"), "agreement": _num(c.get("agreement")),
             "backdoor_p": _num(c.get("backdoor_p"), "{:.3g}"), "flagged": _num(c.get("flagged"), "{}")}
            for c in report.get("ratio_candidates") or []
        ],
        "lam": _num(report.get("lam"), "{:g}"),
        "neurons_pruned": report.get("neurons_pruned", 0),
        "neurons_scored": report.get("neurons_scored", 0),
        "layers_scored": report.get("layers_scored", 0),
        "pruned_layers": [{"layer": n, "count": c} for n, c in pruned[:25]],
        "pruned_layers_more": max(0, len(pruned) - 25),
        "unlearning": {
            "steps": unlearning.get("steps"), "batch": unlearning.get("batch"), "lr": _num(unlearning.get("lr"), "{:g}"),
            "momentum": _num(unlearning.get("momentum"), "{:g}"), "normalized_noise": unlearning.get("normalized_noise"),
            "first_loss": _num(unlearning.get("first_loss")), "last_loss": _num(unlearning.get("last_loss")),
            "images_per_pass": unlearning.get("images_per_pass"), "precision": unlearning.get("precision"),
        },
        "ranking": nwc.get("ranking") or settings.get("ranking") or "-",
        "layer_cap": settings.get("layer_cap") or 0,
        "top_neurons": [
            {"layer": t.get("layer"), "index": t.get("index"), "score": _num(t.get("score"))} for t in nwc.get("top_neurons") or []
        ],
        "fusion": report.get("fusion") or {},
        "clipping": report.get("clipping") or {},
        "agreement": _num((report.get("verification") or {}).get("agreement")),
        "warnings": list(report.get("warnings") or []),
        "publish_check": _publish_check(report.get("publish_verification")),
        "scans": _scan_rows(report),
        "evaluation": None if not ev else {
            "dataset": ev.get("dataset") or "evaluation set",
            "split": ev.get("split"),
            "trigger": _trigger_text(ev.get("trigger")),
            "before": {**{k: _num((ev.get("before") or {}).get(k), "{:.2f}") for k in ("acc", "asr", "ra")},
                       **{k: (ev.get("before") or {}).get(k) for k in ("n_clean", "n_triggered")}},
            "after": {k: _num((ev.get("after") or {}).get(k), "{:.2f}") for k in ("acc", "asr", "ra")},
            "limit": ev.get("limit"),
            "der": _num(ev.get("der"), "{:.1f}"),
        },
        "input": report.get("input") or {},
        "source_dtype": report.get("source_dtype"),
        "settings_json": json.dumps(settings, indent=2, sort_keys=True, default=str),
        "original_card": original,
    }


def render_card(report: dict[str, Any], *, repo_id: str | None = None, source_readme: str | None = None,
                base_url: str = DEFAULT_BASE_URL, redact: Callable[[str], str] | None = None,
                folder_name: str | None = None) -> str:
    """README.md text for the repaired model: YAML metadata plus the body from the template.

    Without ``repo_id`` the card describes a local folder (``folder_name``, the name of the
    ``--output`` folder) and its usage snippet loads from there.

    ``redact`` (a ``str -> str`` callable) scrubs secrets from the final text; the card is
    public, so it is applied to everything, the original card included.
    """
    from huggingface_hub import ModelCard

    model_name = (repo_id or folder_name or f"{source_label(report).split('/')[-1]}-otbr").split("/")[-1]
    model_name = " ".join(model_name.split()) or "model"  # a newline in a folder name would end the card's title
    data = card_data(report, model_name=model_name, source_readme=source_readme, base_url=base_url)
    values = _template_values(report, repo_id=repo_id, source_readme=source_readme, base_url=base_url)
    original = values.pop("original_card")
    # The original card goes in after our text is tidied, so blank lines in its code blocks survive.
    placeholder = "\x00original-card\x00" if original else None
    card = ModelCard.from_template(data, template_path=str(MODEL_TEMPLATE), model_name=model_name,
                                   original_card=placeholder, **values)
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    if placeholder:
        text = text.replace(placeholder, original)
    return redact(text) if redact else text


def render_pr_description(report: dict[str, Any], *, marker: str, files: list[str],
                          redact: Callable[[str], str] | None = None) -> str:
    """The pull request's description: what changed, why, how it was checked, how to decline."""
    import jinja2

    values = _template_values(report, repo_id=None, source_readme=None)
    template = jinja2.Template(PR_TEMPLATE.read_text(encoding="utf-8"), trim_blocks=True, lstrip_blocks=True)
    text = template.render(marker=marker, files=files, **values)
    return redact(text) if redact else text
