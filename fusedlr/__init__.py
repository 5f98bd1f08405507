"""fusedlr: AMP unscaling, global-norm clipping, an on-device LR schedule and AdamW in two passes."""

from .history import HistoryRecords
from .lr_find import LRFindResult, lr_find
from .optimizer import AdamW
from .param_groups import param_groups
from .schedules import SCHEDULE_NAMES, Schedule, get_schedule
from .torch_schedulers import DevicePlateau, from_torch_scheduler

__all__ = [
    "AdamW",
    "Schedule",
    "get_schedule",
    "SCHEDULE_NAMES",
    "from_torch_scheduler",
    "DevicePlateau",
    "param_groups",
    "lr_find",
    "LRFindResult",
    "HistoryRecords",
]
__version__ = "0.1.0"
