"""Small helpers shared by the CPU tests (imported as `helpers`)."""
import contextlib
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_outputs(out) -> torch.Tensor:
    """All tensors of a (nested tuple) model output, e.g. a ControlNet's down + mid residuals
    (FLUX: block + single-block tuples; None parts skipped), as one vector."""
    ts = []
    for part in out:
        if part is None:
            continue
        ts.extend(part if isinstance(part, (tuple, list)) else [part])
    return torch.cat([t.flatten() for t in ts])


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread (tiny models: thread start-up costs more than it saves)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
