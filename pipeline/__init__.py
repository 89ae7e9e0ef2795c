"""The engine: config, ledger, selection, runner, executors, sharding, errors and CLI. It knows no
model, website or stage by name: the application (``stages`` by default) declares them.

The public API that stages use: :mod:`pipeline.stage` (the interface: ``ItemStage``,
``WholeStage``, ``Item``, ``Result``, ``RunContext``), :mod:`pipeline.config` (``StageConfig``,
``StrictModel``), :mod:`pipeline.errors`, :mod:`pipeline.io` (atomic writes, ``file_digest``),
:mod:`pipeline.selection` (``stage_ledger``, ``eligible_frame``, ``upstream_ok``, ``to_python``,
``stale_ids``, ``expected_table``), :mod:`pipeline.fingerprint`,
:mod:`pipeline.ledger` and :mod:`pipeline.text`. The runner, executors, status and locks drive
stages and are not for stages to call (``tests/test_layout.py`` checks it).
"""

__version__ = "0.1.0"
