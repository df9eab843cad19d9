"""otbr-hub: data-free backdoor repair (OTBR) and scanning for image classifiers.

>>> import otbr_hub
>>> result = otbr_hub.repair(model)            # timm / transformers / torch model or folder
>>> result.model, result.report.prune_ratio
>>> result.save("fixed-model")                 # weights in the source format, report and model card
>>> report = otbr_hub.scan(model, "user/vit")  # models, folders, files or Hub repo ids
>>> report.targets[0].verdict, report.targets[0].backdoor.p_value
"""

__version__ = "0.1.0"

from .detect import DetectSettings  # noqa: E402
from .errors import OtbrError, UnsupportedModelError, UsageError  # noqa: E402
from .load import InputSpec, LoadedModel, from_model, load_folder  # noqa: E402
from .push import push_to_hub  # noqa: E402
from .repair import RepairReport, RepairResult, repair  # noqa: E402
from .report import ScanReport  # noqa: E402
from .scan import ScanSettings, scan  # noqa: E402  (the function shadows the submodule name; import helpers from otbr_hub.scan)
from .settings import RepairSettings, preset  # noqa: E402

__all__ = [
    "DetectSettings",
    "InputSpec",
    "LoadedModel",
    "OtbrError",
    "RepairReport",
    "RepairResult",
    "RepairSettings",
    "ScanReport",
    "ScanSettings",
    "UnsupportedModelError",
    "UsageError",
    "from_model",
    "load_folder",
    "preset",
    "push_to_hub",
    "repair",
    "scan",
]
