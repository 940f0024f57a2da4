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


_LYRA_OPTIONS = pytest.StashKey[dict]()  # --lyra-config, parsed once


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (run with -m cuda on the GPU machine)")
    config.addinivalue_line("markers", "slow: whole pipelines")
    try:  # a bad --lyra-config stops the run here, not in every test's set-up
        options = lyradynamo.config.parse(config.getoption("--lyra-config"))
        with lyradynamo.config.patch(**options):
            pass
    except lyradynamo.config.LyraConfigError as exc:
        raise pytest.UsageError(f"--lyra-config {exc}") from None
    config.stash[_LYRA_OPTIONS] = options


def pytest_addoption(parser):
    parser.addoption("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                     help="a lyradynamo.config option in force for every test (repeatable), e.g. "
                          "new_shape_warmup=true to run the suite under another setting; "
                          "a test's own config.patch still wins")


@pytest.fixture(autouse=True)
def fresh_dynamo(request):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with lyradynamo.config.patch(**request.config.stash[_LYRA_OPTIONS]):
        yield
    torch._dynamo.reset()
