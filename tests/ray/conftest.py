"""One local Ray cluster (2 CPUs) for the whole test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

ENGINE_TESTS = Path(__file__).parent.parent / "pipeline"
sys.path.insert(0, str(ENGINE_TESTS))  # the toy application and engine_helpers


@pytest.fixture(scope="session")
def cluster() -> Iterator[None]:
    # Workers import the toy application from the engine tests' folder; each task names its
    # application itself (WorkerSpec.app), so one cluster serves the toy and the real stages.
    pythonpath = os.pathsep.join([str(ENGINE_TESTS), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    yield
    ray.shutdown()
