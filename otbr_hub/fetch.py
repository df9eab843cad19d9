"""Sources on the Hugging Face Hub: parse ids, preflight through the API, download.

Filled in by the Hub integration; the id parsing is here so local paths and repo ids are
told apart in one place.
"""

from __future__ import annotations

import re

_REPO_ID = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[^\s]+)?$")


def is_repo_id(text: str) -> bool:
    """``user/model``, ``user/model@rev`` or ``hf-hub:user/model`` (not a filesystem path)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    return bool(_REPO_ID.match(text)) and "/" in text.split("@", 1)[0]
