"""``routecap diff A B``: routing agreement of two captures of the same requests.

Typical use: inference traces against a training re-capture of the same sequences, or two
precisions of one model (``routecap capture --dtype float32`` vs ``--dtype bfloat16``).
"""

from __future__ import annotations

import os

from .analysis import Agreement, AgreementCounter
from .files import open_traces

__all__ = ["diff_traces"]


def diff_traces(a_path: str | os.PathLike, b_path: str | os.PathLike, *,
                diverged: str = "prefix") -> Agreement:
    """:func:`routecap.analysis.agreement` of two trace folders (or files), paired by request id.

    Both sides must hold the same requests; a request on one side only is a ValueError naming
    (the first few of) those on each side. B's traces are read once, shard by shard, and A's are
    streamed against them. Two generations may sample different tokens: by default
    (``diverged="prefix"``) each request is compared up to its first differing token and the rest is
    counted; ``diverged="error"`` makes that an error naming the request and position.
    """
    ta, tb = open_traces(a_path), open_traces(b_path)
    ids_a, ids_b = ta.request_ids(), tb.request_ids()
    set_a, set_b = set(ids_a), set(ids_b)
    only_a = [r for r in ids_a if r not in set_b]
    only_b = [r for r in ids_b if r not in set_a]
    if only_a or only_b:
        raise ValueError(
            f"{a_path} and {b_path} hold different requests: {len(only_a)} only in A "
            f"{only_a[:5]}, {len(only_b)} only in B {only_b[:5]}; diff compares captures of the "
            "same requests")
    by_id = {t.request_id: t for t in tb}
    c = AgreementCounter()
    for t in ta:
        c.add(t, by_id[t.request_id], diverged=diverged)
    return c.result(a=str(a_path), b=str(b_path), model_a=ta.shared.get("model"),
                    model_b=tb.shared.get("model"))
