"""routecap: capture, store, replay and analyse Mixture-of-Experts routing decisions."""

from .trace import FORMAT_VERSION, RoutingTrace, TraceValidationError, id_dtype_for, validate_trace

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "RoutingTrace",
    "TraceValidationError",
    "__version__",
    "id_dtype_for",
    "validate_trace",
]
