"""Pure functions with fast kernels behind one signature each (no modules, no models)."""

from .selective_scan import (
    BackendUnavailableError,
    available_backends,
    selective_scan,
    selective_scan_reference,
    selective_state_update,
)

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "selective_scan",
    "selective_scan_reference",
    "selective_state_update",
]
