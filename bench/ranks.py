"""Run a measurement on N CPU ranks under gloo and hand back rank 0's result.

    from ranks import run_ranks
    result = run_ranks(measure, args, world=4)   # measure(rank, args) -> dict | None

Each rank is a spawned process with one thread, rendezvousing through a FileStore in a
temporary directory; `measure` runs inside an initialised default process group, which
is destroyed afterwards whatever happens. `measure` must be a module-level function of
the bench script (spawn pickles it by name) and its rank-0 result must be JSON.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Measure = Callable[[int, dict[str, Any]], dict[str, Any] | None]


def _worker(rank: int, measure: Measure, store_path: str, world: int, args: dict[str, Any],
            result_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        result = measure(rank, args)
        if rank == 0 and result is not None:
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(measure: Measure, args: dict[str, Any], world: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        mp.start_processes(_worker, args=(measure, str(Path(tmp) / "store"), world, args, str(result)),
                           nprocs=world, start_method="spawn")
        measured: dict[str, Any] = json.loads(result.read_text())
    return measured
