"""One rank of a capture (routecap.capture_job) that then checks no thread of the process group
outlives it: gloo's loop and worker threads, or the TCPStore's, still running when the
interpreter finalizes is the teardown race (`terminate called without an active exception`).

Usage (under torchrun): teardown_worker.py OUT DISPATCH
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from routecap.capture_job import CaptureJob, run_capture_job
from routecap.prompts import Prompt

GROUP_THREADS = ("gloo", "pt_gloo", "pt_tcpstore")


def threads() -> list[str]:
    names = []
    for t in sorted(os.listdir("/proc/self/task")):
        try:
            names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except OSError:
            pass
    return names


def main() -> None:
    out, dispatch = Path(sys.argv[1]), sys.argv[2]
    prompts = [Prompt(request_id=str(i), token_ids=(5 + i, 6, 7)) for i in range(3)]
    job = CaptureJob(model="builtin:tiny-qwen3-moe", prompts=prompts, out_dir=out,
                     max_new_tokens=1, batch_size=1, dtype=torch.float32, dispatch=dispatch)
    run_capture_job(job)
    left = [n for n in threads() if n.startswith(GROUP_THREADS)]
    print(f"rank {os.environ['RANK']}: threads after the job: {threads()}", flush=True)
    if left:
        print(f"process-group threads alive after the job: {left}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
