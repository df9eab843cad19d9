"""otbr-hub: data-free backdoor repair (OTBR) and scanning for image classifiers.

>>> import otbr_hub
>>> result = otbr_hub.repair(model)            # timm / transformers / torch model or folder
>>> result.model, result.report.prune_ratio
>>> result.save("fixed-model")                 # weights in the source format, report and model card
>>> report = otbr_hub.scan(model, "user/vit")  # models, folders, files or Hub repo ids
>>> report.targets[0].verdict, report.targets[0].backdoor.p_value
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names and the submodules that define them. They are imported on first use
# (PEP 562), so `otbr-hub --help`, a usage error or `import otbr_hub` does not wait seconds
# for torch, and Ctrl-C during those imports reaches the CLI's handler.
_EXPORTS = {
    "DetectSettings": "detect",
    "OtbrError": "errors",
    "UnsupportedModelError": "errors",
    "UsageError": "errors",
    "InputSpec": "load",
    "LoadedModel": "load",
    "from_model": "load",
    "load_folder": "load",
    "push_to_hub": "push",
    "RepairReport": "repair",
    "RepairResult": "repair",
    "repair": "repair",
    "ScanReport": "report",
    "ScanSettings": "scan",
    "scan": "scan",
    "RepairSettings": "settings",
    "preset": "settings",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .detect import DetectSettings
    from .errors import OtbrError, UnsupportedModelError, UsageError
    from .load import InputSpec, LoadedModel, from_model, load_folder
    from .push import push_to_hub
    from .repair import RepairReport, RepairResult, repair
    from .report import ScanReport
    from .scan import ScanSettings, scan
    from .settings import RepairSettings, preset


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'otbr_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


class _Package(types.ModuleType):
    """``otbr_hub.repair`` and ``otbr_hub.scan`` are functions, named like the submodules that
    define them. Loading a submodule sets the package attribute of its name to the module;
    for these two that would hide the function, so that one assignment is skipped (the
    submodules stay importable: ``from otbr_hub.scan import ScanSettings``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
