"""The one stage interface (after datatrove's ``PipelineStep`` and NeMo Curator's
``ProcessingStage``).

A stage names itself and its upstream stage, loads heavy things once in :meth:`Stage.setup`, and
maps a batch of items to a batch of results in :meth:`Stage.process`. It never loops over the
dataset, never shards and never writes the ledger: the runner does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import BaseModel

from pipeline.config import StageConfig
from pipeline.errors import ItemError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

#: A stage's own config section (``config.<name>``): ``class S(ItemStage[SConfig])``.
C = TypeVar("C", bound=BaseModel)
IC = TypeVar("IC", bound=StageConfig)
M = TypeVar("M", bound=BaseModel)

Status = Literal["ok", "failed_permanent", "failed_transient"]
STATUSES: tuple[str, ...] = ("ok", "failed_permanent", "failed_transient", "pending")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs (used by executors that schedule workers)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Item:
    """One clip as a stage sees it: the clip row plus the ok outputs of every upstream stage.

    ``attempt`` counts this item's tries; ``seq`` is the ledger ``seq`` of the row this attempt
    supersedes (0: none), so the row it writes gets ``seq + 1`` (the ledger's clock-free order).
    """

    clip_id: str
    data: dict[str, Any]
    attempt: int = 1
    seq: int = 0
    #: The fingerprint this attempt's row gets (its settings and the values it reads, hashed).
    fingerprint: str | None = None
    #: A redo's previous ok row (its output columns and fingerprint): kept current if the redo fails.
    previous: dict[str, Any] | None = None
    #: The fingerprint of the stage's layer (scores) for this row, when the stage has one.
    layer_fingerprint: str | None = None
    #: Only the layer is to be made anew (:meth:`ItemStage.refresh`): ``previous`` is the row.
    refresh: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


@dataclass
class Result:
    """What a stage says about one item. ``outputs`` must match the stage's output schema."""

    clip_id: str
    status: Status = "ok"
    outputs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    message: str = ""
    #: Whether the stage's layer (its scores) was made: False keeps the row (its captions, its
    #: merges) with the layer missing, which the next plain run refreshes.
    layer: bool = True

    @classmethod
    def ok(cls, clip_id: str, **outputs: Any) -> Result:
        return cls(clip_id, "ok", outputs)

    @classmethod
    def failed(cls, clip_id: str, error: ItemError, **outputs: Any) -> Result:
        return cls(clip_id, error.status, outputs, error.reason, error.message)


@dataclass
class RunContext:
    """Where a run's files live, and the resolved config."""

    workdir: Path
    config: BaseModel

    @property
    def media_dir(self) -> Path:
        return self.workdir / "media"

    @property
    def tmp_dir(self) -> Path:
        """Where media writers put files being written (one flat folder, on the media folder's
        filesystem, so a rename into place is atomic and cleaning up never walks the media)."""
        return self.media_dir / ".tmp"

    def stage_dir(self, stage: type[Stage] | Stage) -> Path:
        return self.workdir / stage.dirname()


@dataclass
class RunOptions:
    """Options of one ``avcaps run`` invocation."""

    shard: tuple[int, int] | None = None
    limit: int | None = None
    retry_failed: bool = False
    force: bool = False
    progress: bool = True
    executor: str = "local"
    ray_address: str | None = None
    concurrency: int | None = None
    drop_previous: bool = False


class Stage(ABC, Generic[C]):
    """Base of every stage. Subclasses set the class variables and implement the hooks.

    A stage reads its own config section as :attr:`cfg`, typed by its declaration
    (``class CaptionStage(ItemStage[CaptionConfig])``), and another stage's section only through
    :meth:`section`, for the types it declares in :attr:`uses`: every dependency between sections
    is written down (``tests/test_layout.py`` checks the code keeps to it).
    """

    number: ClassVar[int]
    name: ClassVar[str]
    upstream: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    resources: ClassVar[Resources] = Resources()
    #: The config sections of other stages this stage reads (their types), through :meth:`section`.
    uses: ClassVar[tuple[type[BaseModel], ...]] = ()

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.config = ctx.config

    @property
    def cfg(self) -> C:
        """This stage's own section of the run config (``config.<name>``)."""
        return cast(C, getattr(self.config, self.name))

    def section(self, kind: type[M]) -> M:
        """Another stage's config section, of a type this stage declares in :attr:`uses`."""
        if kind not in self.uses:
            raise TypeError(
                f"{type(self).__name__} reads a {kind.__name__} section it does not declare in `uses`"
            )
        found = [v for v in dict(self.config).values() if isinstance(v, kind)]
        if len(found) != 1:
            raise TypeError(f"the run config has {len(found)} {kind.__name__} sections, not one")
        return found[0]

    @classmethod
    def dirname(cls) -> str:
        return f"{cls.number:02d}-{cls.name}"

    @property
    def folder(self) -> Path:
        return self.ctx.stage_dir(self)

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        """The typed output columns this stage adds to its ledger (if it keeps one): the one
        source of the stage's column contract (stand-ins and tests import it, never copy it)."""
        return []

    def fingerprint_settings(self) -> dict[str, Any]:
        """The settings that change this stage's output (model id and revision, prompt hash,
        decoding parameters...; not batch sizes, devices or paths of temp files). A row made under
        other settings, or from other values of what it reads, is stale (:mod:`pipeline.fingerprint`)."""
        return {}

    def legacy_fingerprint_settings(self) -> list[dict[str, Any]]:
        """The settings as this stage declared them when its rows were chain-fingerprinted (before
        fingerprints hashed the values read): a legacy row equal to one of them is current."""
        return [self.fingerprint_settings()]

    def write_dirs(self) -> list[Path]:
        """The folders this stage writes to, whose filesystems must stay writable with room to
        spare (:mod:`pipeline.machine`): the run folder (logs, config), the stage's own folder
        (stats), its ledger and the media temp folder (media writers rename from it, so it is on
        the media's filesystem). A stage that writes elsewhere adds its folders; one that never
        writes media may leave the temp folder out (its media may sit on a read-only disk)."""
        return [self.ctx.workdir, self.folder, self.folder / "ledger", self.ctx.tmp_dir]

    def setup(self) -> None:
        """Load heavy things (models, clients) once per worker."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired."""

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        """Stage-specific figures added to ``stats.json`` and ``avcaps status --json``."""
        return {}


class ItemStage(Stage[IC]):
    """A stage that maps items to results; the runner owns the loop, sharding and ledger."""

    @property
    def stage_config(self) -> StageConfig:
        """Its section as the runner reads it (batch size, attempts, backoff, commits)."""
        return self.cfg

    #: Upstream columns :meth:`select` looks at (read for every clip, so keep it short).
    selection_columns: ClassVar[tuple[str, ...]] = ()
    #: Output columns that make the stage's layer (scores): recomputed on their own by
    #: :meth:`refresh`, fingerprinted apart (:meth:`layer_settings`), never making the row stale.
    layer_columns: ClassVar[tuple[str, ...]] = ()
    #: What the layer is called in messages and status ("scores").
    layer_name: ClassVar[str] = "layer"
    #: What this run has to do, set by the runner before :meth:`setup`: "process" (rows to make)
    #: and/or "refresh" (layers to make anew), so setup loads only what that needs.
    work: frozenset[str] = frozenset({"process"})

    def reads(self) -> tuple[str, ...] | None:
        """The upstream columns this stage's rows are made from: the runner reads them (with
        :meth:`carries` and :attr:`selection_columns`), checks them against the upstream schema,
        and a row's fingerprint hashes their values (a file column by its file's digest). None:
        every upstream output column."""
        return None

    def carries(self) -> tuple[str, ...]:
        """Upstream columns the items carry that do not make the row (read, not fingerprinted)."""
        return ()

    def layer_settings(self) -> dict[str, Any] | None:
        """The settings of the layer (a scorer's model and revision); None: no layer now."""
        return None

    def layer_reads(self) -> tuple[str, ...]:
        """Upstream columns the layer is made from (fingerprinted into the layer only)."""
        return ()

    @classmethod
    def has_layer(cls) -> bool:
        """Whether the stage makes a layer apart from its rows (it implements :meth:`refresh`)."""
        return cls.refresh is not ItemStage.refresh

    def refresh(self, batch: list[Item]) -> list[Result]:
        """Make the layer of ``batch`` anew (``item.previous``: its current row, kept as it is
        otherwise): one result per item, the row's outputs with new layer columns. A stage that
        has a layer implements it; without it, a stale layer is a full redo."""
        raise NotImplementedError

    def select(self, table: pd.DataFrame) -> Any:
        """Which clips this stage applies to at all (for example, only the test split): a boolean
        mask over ``table`` (one row per clip ok upstream, columns :attr:`selection_columns`).
        Vectorized, because it runs over every clip of the run at every start and status."""
        return None  # every clip

    def order(self, table: pa.Table) -> Any:
        """Optional: in which order a run works on the clips (and ``--limit`` takes them): row
        indices of ``table`` (every clip the stage applies to: ok upstream, kept by :meth:`select`,
        with all upstream columns), first to last, or None for clip-table order. Batches follow
        it; shards keep it among their own clips; retries of a pass come after the pass."""
        return None

    @abstractmethod
    def process(self, batch: list[Item]) -> list[Result]:
        """Map a batch of items to one result per item (any order)."""

    def dry_run(self, batch: list[Item]) -> Iterator[str]:
        """Optional (``avcaps run STAGE --dry-run N``): try ``batch`` after :meth:`setup` without
        committing anything, and yield text for the user, e.g. what the stage would send to a
        service and what it would decide. A stage offers a dry run by overriding this."""
        raise NotImplementedError


class WholeStage(Stage[C]):
    """A stage that works on the run as a whole (ingest, export, publish)."""

    def stale_count(self) -> int | None:
        """How many of the items this stage last produced are stale now (e.g. exported clips whose
        upstream rows changed since); None when the stage cannot tell. Shown by ``avcaps status``."""
        return None

    @abstractmethod
    def run(self, options: RunOptions) -> dict[str, Any]:
        """Do the work; return a summary that is saved in the stage's ``stats.json``."""
