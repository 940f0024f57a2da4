"""Shared fixtures: fresh Dynamo state per test, tiny zoo models, a relative-error helper."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lyradynamo  # noqa: E402
from lyradynamo import fake_shortcuts  # noqa: E402
from lyradynamo.passes import matcher  # noqa: E402

# Every rewrite that reuses its root's fake value is checked against the op's own fake result.
matcher.CHECK_SAME_VALUE = True
# Every linear whose fake value tracing shortcuts is also run in full and compared.
fake_shortcuts.CHECK = True


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (run with -m cuda on the GPU machine)")
    config.addinivalue_line("markers", "slow: whole pipelines")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    yield
    torch._dynamo.reset()
