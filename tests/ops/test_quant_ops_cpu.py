"""lyra::quantize, lyra::adaln_quant, lyra::qlinear_q: opcheck and agreement with the ops they
stand for (quantize + qlinear == qlinear; adaln_quant == quantize(adaln))."""
import pytest
import torch

import lyradynamo  # noqa: F401
from lyradynamo.quant import numerics

lyra = torch.ops.lyra
g = torch.Generator().manual_seed(11)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def _opcheck(op, args, kind):
    # test_schema compares float8 tensors with CPU ops float8 lacks; the others run for both kinds
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if kind == "fp8" else None
    torch.library.opcheck(op, args, **({"test_utils": utils} if utils else {}))


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantize_then_qlinear_q_equals_qlinear(kind):
    x, w, b = rnd(2, 5, 32), rnd(48, 32), rnd(48)
    gate, res = rnd(2, 1, 48), rnd(2, 5, 48)
    wq, ws = numerics.quantize_rows(w, kind)
    q, s = lyra.quantize(x, kind, None)
    _opcheck(lyra.quantize.default, (x, kind, None), kind)
    args = (q, s, wq, ws, b, "none", False, gate, res, kind, torch.float32)
    _opcheck(lyra.qlinear_q.default, args, kind)
    out = lyra.qlinear_q(*args)
    torch.testing.assert_close(out, lyra.qlinear(x, wq, ws, b, "none", False, gate, res, kind, None),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_adaln_quant_is_quantize_of_adaln(kind, norm, offset):
    x = rnd(2, 7, 40)
    w = rnd(40) if norm == "rms" else None
    mul, add = 1 - offset + 0.1 * rnd(2, 1, 40), rnd(2, 1, 40)  # the factor is offset + mul
    args = (x, w, None, mul, add, norm, 1e-6, kind, offset)
    _opcheck(lyra.adaln_quant.default, args, kind)
    q, s = lyra.adaln_quant(*args)
    rq, rs = numerics.quantize_rows(lyra.adaln(x, w, None, mul, add, norm, 1e-6, offset), kind)
    assert torch.equal(q.view(torch.int8), rq.view(torch.int8)) and torch.equal(s, rs)
    if offset:  # the offset is not dropped: without it the quantised row differs
        assert not torch.equal(s, lyra.adaln_quant(*args[:8])[1])
