"""otbr-hub: data-free backdoor repair (OTBR) and scanning for image classifiers.

>>> import otbr_hub
>>> result = otbr_hub.repair(model)            # timm / transformers / torch model or folder
>>> result.model, result.report.prune_ratio
"""

__version__ = "0.1.0"

from .errors import OtbrError, UnsupportedModelError, UsageError  # noqa: E402
from .load import InputSpec, LoadedModel, from_model, load_folder  # noqa: E402
from .push import push_to_hub  # noqa: E402
from .repair import RepairReport, RepairResult, repair  # noqa: E402
from .settings import RepairSettings, preset  # noqa: E402

__all__ = [
    "InputSpec",
    "LoadedModel",
    "OtbrError",
    "RepairReport",
    "RepairResult",
    "RepairSettings",
    "UnsupportedModelError",
    "UsageError",
    "from_model",
    "load_folder",
    "preset",
    "push_to_hub",
    "repair",
]
