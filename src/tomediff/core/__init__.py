"""Hook mechanics: per-call state, the per-block merge plan, attaching and detaching."""

from tomediff.core.hooks import ToMeHook, install, remove_hooks
from tomediff.core.spec import BlockSpec, GridSource, Site, SiteKind
from tomediff.core.state import BlockStats, PlanEvent, ToMeState

__all__ = [
    "BlockSpec",
    "BlockStats",
    "GridSource",
    "PlanEvent",
    "Site",
    "SiteKind",
    "ToMeHook",
    "ToMeState",
    "install",
    "remove_hooks",
]
