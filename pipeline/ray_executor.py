"""``--executor ray``: the runner's pass over pending items as a Ray Dataset.

The driver turns the pending items into a Ray Dataset and maps the stage's own ``process(batch)``
over it: stages that declare no GPU run as Ray tasks (a worker process keeps its set-up stage
between tasks), GPU stages as an actor pool (one model load per actor, ``num_gpus`` from the
stage's declared resources). Workers commit their batches to the ledger themselves, so the
ledger's guarantees hold unchanged: per-batch commits, per-item resume. A part's name is derived
from the pass and the batch's items, so a task that Ray retries after a worker died replaces its
own part instead of duplicating rows.

The run folder must be visible to every worker at the same path (one machine, or a shared POSIX
filesystem): ledger commits rely on an atomic rename in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.executors import process_and_commit
from pipeline.selection import stage_ledger
from pipeline.stage import Item, ItemStage, RunContext, RunOptions

if TYPE_CHECKING:
    from pipeline.selection import WorkList

log = logging.getLogger("avcaps")
_STAGE_CACHE: dict[str, ItemStage] = {}


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild the stage: plain strings, cheap to ship."""

    app: str
    stage: str
    config_model: str
    config_json: str
    workdir: str
    pass_token: str
    drop_previous: bool = False
    work: tuple[str, ...] = ("process",)  # what the run has to do (ItemStage.work), for setup

    def key(self) -> str:
        return hashlib.sha1(
            f"{self.stage}|{self.config_json}|{self.workdir}|{self.work}".encode()
        ).hexdigest()


def _build_stage(spec: WorkerSpec) -> ItemStage:
    """The stage for this spec, set up once per worker process."""
    # A worker process may serve several applications' tasks in turn: the spec names its own.
    os.environ["AVCAPS_APP"] = spec.app
    stage = _STAGE_CACHE.get(spec.key())
    if stage is None:
        from pathlib import Path

        from pipeline.registry import load_object

        model = load_object(spec.config_model)
        cfg = model.model_validate_json(spec.config_json)
        stage = load_object(spec.stage)(RunContext(workdir=Path(spec.workdir), config=cfg))
        stage.work = frozenset(spec.work)
        stage.setup()
        _STAGE_CACHE[spec.key()] = stage
    return stage


def _part_name(spec: WorkerSpec, items: list[Item]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for it in sorted(items, key=lambda i: i.clip_id):
        h.update(f"{it.clip_id}:{it.attempt}:{it.seq};".encode())
    return f"{spec.pass_token}-{h.hexdigest()}"


SUMMARY_KEYS = ("clip_id", "status", "attempts", "seq")


def process_records(batch: dict[str, Any], spec: WorkerSpec) -> dict[str, list[Any]]:
    """Process one Ray batch (columns clip_id, attempt, seq, and data: the item's upstream data,
    fingerprint and previous row as JSON) and commit it; return summaries.

    An :class:`AbortRun` (the stage's own, or from its setup) does not leave the worker as an
    exception: Ray Data re-raises a task's error as its own ``UserCodeException`` without the
    original type, so the exit status would be lost. The batch's finished results are committed
    and the abort travels back as one summary row (``abort``: class and message) that the driver
    raises again."""
    items = []
    for cid, att, seq, payload in zip(
        batch["clip_id"], batch["attempt"], batch["seq"], batch["data"], strict=True
    ):
        it = json.loads(payload)
        items.append(
            Item(
                str(cid),
                it["data"],
                int(att),
                int(seq),
                it["fingerprint"],
                it["previous"],
                it.get("layer_fingerprint"),
                bool(it.get("refresh")),
            )
        )
    try:
        stage = _build_stage(spec)
        rows = process_and_commit(
            stage, stage_ledger(stage), items, _part_name(spec, items), spec.drop_previous
        )
    except AbortRun as exc:
        cls = type(exc)
        abort = json.dumps({"cls": f"{cls.__module__}:{cls.__qualname__}", "message": str(exc)})
        return {"clip_id": [""], "status": ["abort"], "attempts": [0], "seq": [0], "abort": [abort]}
    out: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in SUMMARY_KEYS}
    out["abort"] = [""] * len(rows)
    return out


def _raise_abort(payload: str) -> None:
    """Raise again, in the driver, the AbortRun a worker stopped with."""
    from pipeline.registry import load_object

    info = json.loads(payload)
    try:
        cls = load_object(info["cls"])
    except Exception:
        cls = AbortRun
    if not (isinstance(cls, type) and issubclass(cls, AbortRun)):
        cls = AbortRun
    raise cls(info["message"])


class _Actor:
    """An actor-pool worker for GPU stages: sets the stage up once in its constructor."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        _build_stage(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        return process_records(batch, self.spec)


class RayExecutor:
    """Runs passes over pending items on a Ray cluster (``ray.init(address=...)``)."""

    def __init__(self, stage: ItemStage, options: RunOptions) -> None:
        self.stage = stage
        self.options = options
        self.passes = 0
        self.run_token = f"{time.time_ns():020d}"

    def __enter__(self) -> RayExecutor:
        import ray

        from pipeline.registry import app

        if not ray.is_initialized():
            env = {"AVCAPS_APP": app().__name__}
            if os.environ.get("PYTHONPATH"):
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            ray.init(
                address=self.options.ray_address,
                runtime_env={"env_vars": env},
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = self.options.progress
        data_ctx.print_on_execution_start = False
        return self

    def __exit__(self, *exc: object) -> None:
        """The cluster outlives the stage; ``ray.shutdown()`` is the caller's business."""

    def _spec(self) -> WorkerSpec:
        from pipeline.registry import app

        cls = type(self.stage)
        model = type(self.stage.config)
        self.passes += 1
        return WorkerSpec(
            app=app().__name__,
            stage=f"{cls.__module__}:{cls.__qualname__}",
            config_model=f"{model.__module__}:{model.__qualname__}",
            config_json=self.stage.config.model_dump_json(),
            workdir=str(self.stage.ctx.workdir.resolve()),
            pass_token=f"{self.run_token}-{self.passes:03d}",
            drop_previous=self.options.drop_previous,
            work=tuple(sorted(self.stage.work)),
        )

    def run_pass(self, todo: WorkList) -> Iterator[list[dict[str, Any]]]:
        import ray

        spec = self._spec()
        size = self.stage.stage_config.batch_size
        records = [
            {
                "clip_id": it.clip_id,
                "attempt": it.attempt,
                "seq": it.seq,
                "data": json.dumps(
                    {
                        "data": it.data,
                        "fingerprint": it.fingerprint,
                        "previous": it.previous,
                        "layer_fingerprint": it.layer_fingerprint,
                        "refresh": it.refresh,
                    }
                ),
            }
            for it in todo.items()
        ]
        # Any: Ray's stubs type each step's Dataset apart (materialized or not, per batch format).
        ds: Any = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // size)))
        res = self.stage.resources
        available = ray.cluster_resources()
        # A worker asking for more CPUs than any node has would never be scheduled: clamp it.
        biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        cpus = min(res.cpus, biggest)
        if cpus < res.cpus:
            log.warning(
                "%s: a worker asks for %s CPUs, the largest Ray node has %s",
                self.stage.dirname(),
                res.cpus,
                biggest,
            )
        workers = self.options.concurrency or max(1, int(available.get("CPU", 1)))
        if res.gpus > 0:
            # One model load per actor. A cluster without GPUs would never schedule an actor that
            # asks for one: there the stage runs on CPUs (as it does locally), said once.
            gpus = res.gpus if available.get("GPU", 0) >= res.gpus else 0
            if not gpus:
                log.warning("%s: the Ray cluster has no GPU; its actors run on CPUs", self.stage.dirname())
            pool = int(available.get("GPU", 0) // res.gpus) if gpus else 1
            ds = ds.map_batches(
                _Actor,
                fn_constructor_args=(spec,),
                batch_size=size,
                concurrency=self.options.concurrency or max(1, pool),
                num_gpus=gpus,
                num_cpus=cpus,
            )
        else:
            ds = ds.map_batches(
                process_records, fn_args=(spec,), batch_size=size, concurrency=workers, num_cpus=cpus
            )
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for payload in out["abort"]:
                if payload:
                    _raise_abort(str(payload))
            yield [
                {"clip_id": str(c), "status": str(s), "attempts": int(a), "seq": int(q)}
                for c, s, a, q in zip(out["clip_id"], out["status"], out["attempts"], out["seq"], strict=True)
            ]
