"""Fixtures the loader tests share (each test module gets its own copy: module scope)."""

import pytest

from tests.unit.data_helpers import read_directly, request_plan, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small multi-bucket shard dataset (a module may define its own `dataset` instead)."""
    return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(dataset):
    """Every request of the plan read directly, one by one, from a fresh reader."""
    return read_directly(dataset, request_plan())
