"""``routecap report``: one self-contained HTML page about a capture (and its agreement with another).

Example:
    >>> from routecap.report import render_report, write_report  # doctest: +SKIP
    >>> write_report("report.html", render_report(open_traces("runs/demo"), source="runs/demo"))
"""

from .build import default_ep_size, render_report, write_report
from .stats import Limits, ReportStats, collect_stats

__all__ = ["Limits", "ReportStats", "collect_stats", "default_ep_size", "render_report", "write_report"]
