"""GPU tests of the CUDA library (lyradynamo._C).

Everything under tests/cuda is skipped, with the reason, when there is no usable
GPU (torch.cuda.is_available() is False) or the extension was not built.
Build it first: cmake -S . -B build && cmake --build build -j (see CMakeLists.txt).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

# Plain `pytest` (unlike `python -m pytest`) does not put the repo root on
# sys.path; the built module lives in <root>/lyradynamo/ by default.
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs an NVIDIA GPU and the built lyradynamo._C extension"
    )


def _skip_reason() -> str | None:
    try:
        import torch
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"torch is not importable ({exc!r})"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    try:
        importlib.import_module("lyradynamo._C")
    except Exception as exc:
        return f"lyradynamo._C cannot be imported ({exc!r}); build it with CMake first"
    return None


@pytest.fixture(scope="module")
def C():
    """The lyradynamo._C module (the raw kernels)."""
    from lyradynamo import _C

    return _C


@pytest.fixture
def no_tf32():
    """fp32 matmul references without TF32."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def fresh_gemm_decisions(monkeypatch):
    """gated_gemm's decisions start empty for the test: a shape that an earlier test timed at an
    M within 4x would otherwise be reused (no timings recorded) where the test asserts them."""
    from lyradynamo.ops import gated_gemm

    monkeypatch.setattr(gated_gemm, "_choice", {})


@pytest.fixture
def seed_from_test_id(request):
    """A torch seed derived from the test's id: fresh inputs per test, reproducible runs."""
    import zlib

    import torch

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def no_fallback():
    """The test fails if any lyra:: op ran its PyTorch reference instead of csrc."""
    from lyradynamo.ops import _common

    _common.reset_fallback_counts()
    yield
    assert _common.fallback_counts() == {}, _common.fallback_counts()


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if str(it.path).startswith(_HERE + os.sep)]
    if not mine:
        return
    reason = _skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for it in mine:
        it.add_marker(marker)
