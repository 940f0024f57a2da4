"""conv_bias: convolution biases (+ time-embedding adds, residual adds, output scale) folded into
lyra::group_norm(pre_bias=...) and lyra::bias_residual; the two ops' references on odd shapes in
both layouts."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyradynamo
from lyradynamo import backend, zoo
from lyradynamo.ops import bias_residual as br_op
from lyradynamo.ops import group_norm as gn_op
from helpers import rel_err

lyra = torch.ops.lyra
g = torch.Generator().manual_seed(4321)
CONV2D = {torch.conv2d, F.conv2d}


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@pytest.fixture
def graphs(monkeypatch):
    """The rewritten FX graphs of the torch.compile calls in the test."""
    seen = []
    real = backend.run_passes

    def spy(gm, names, fake_mode):
        gm, report = real(gm, names, fake_mode)
        seen.append(gm.graph)
        return gm, report

    monkeypatch.setattr(backend, "run_passes", spy)
    return seen


def _biased_convs_into_group_norm(graph):
    """conv2d nodes with a bias that feed a lyra::group_norm directly or through adds."""
    bad = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in CONV2D and (len(n.args) > 2 and n.args[2] is not None
                                                               or n.kwargs.get("bias") is not None):
            todo = list(n.users)
            while todo:
                u = todo.pop()
                if u.target is lyra.group_norm.default:
                    bad.append(n.name)
                elif u.op == "call_function" and u.target in (torch.add, operator.add):
                    todo.extend(u.users)
    return bad


def _adds_into_pre_bias(graph):
    """add nodes whose output is a lyra::group_norm's pre-bias: with one time embedding per
    norm, the conv's bias and the embedding reach the norm as its two pre-biases, no add."""
    return [a.name for n in graph.nodes if n.target is lyra.group_norm.default
            for a in n.args[7:] if isinstance(a, torch.fx.Node) and a.target in (torch.add, operator.add)]


# ---- whole models ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,channels_last", [("sd15", False), ("sd15", True), ("sdxl", False)])
def test_unet_one_compilation_matches_eager(name, channels_last, graphs):
    model = zoo.build_denoiser(name, tiny=True, dtype=torch.float32, device="cpu")
    with lyradynamo.config.patch(channels_last=channels_last):
        compiled = torch.compile(model, backend="lyra")
        with torch.no_grad():
            for i, (b, h, w) in enumerate([(2, 64, 64), (1, 96, 64), (3, 64, 80)]):
                inputs = zoo.denoiser_inputs(name, model, batch=b, height=h, width=w, seed=i)
                with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
                    out = compiled(**inputs)[0]
                assert rel_err(out, model(**inputs)[0]) < 1e-5, (b, h, w)
    assert lyradynamo.compile_count() == 1
    (rec,) = lyradynamo.compiled_graphs()
    assert not rec.summary["errors"]
    hits = rec.summary["matched"]["conv_bias"]
    assert hits.get("conv+bias+add->group_norm", 0) > 0  # ResnetBlock2D conv1 + temb -> norm2
    assert hits.get("conv+bias+residual(conv+bias)", 0) > 0  # conv2 + conv_shortcut(input)
    assert hits.get("conv+bias+residual", 0) > 0  # conv2 + input, proj_out + residual
    (graph,) = graphs
    assert _biased_convs_into_group_norm(graph) == []
    assert _adds_into_pre_bias(graph) == []
    convs = [n for n in graph.nodes if n.op == "call_function" and n.target in CONV2D]
    assert convs and all(n.args[2] is None for n in convs)  # every bias moved out of the conv
    # one rewrite per convolution, two convolutions where the residual is a biased conv too
    rewrites = rec.summary["op_histogram"]["lyra::bias_residual"] + hits["conv+bias+add->group_norm"]
    assert rewrites == len(convs) - sum(n for k, n in hits.items() if "(conv+bias)" in k)


class Block(nn.Module):
    """A ResNet block in the shape of diffusers' ResnetBlock2D, plus the variants the pass takes:
    a (C, 1, 1) parameter added before a norm, a conv with two users, a multiplied output."""

    def __init__(self, cin=6, c=12, temb=10, groups=3, scale=1.5):
        super().__init__()
        self.norm1 = nn.GroupNorm(2, cin)
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.temb = nn.Linear(temb, c)
        self.norm2 = nn.GroupNorm(groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, c, 1)
        self.shift = nn.Parameter(torch.randn(c, 1, 1))
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.norm3 = nn.GroupNorm(groups, c)
        self.conv4 = nn.Conv2d(c, c, 1)
        self.scale = scale

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(t))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        h = (self.shortcut(x) + h) / self.scale  # (b) + residual conv bias + scale
        y = self.conv3(h)
        z = self.norm3(self.shift + y)  # (a) with a (C, 1, 1) add on the left
        u = self.conv4(z)  # (c): two users
        return u * 0.5 + u.mean()


@pytest.mark.parametrize("channels_last", [False, True])
def test_block_patterns(channels_last, graphs):
    torch.manual_seed(0)
    block = Block().eval()
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
    compiled = torch.compile(block, backend="lyra")
    with torch.no_grad():
        for i, (b, h, w) in enumerate([(2, 5, 7), (3, 9, 3)]):  # H*W odd, C = 12
            x = rnd(b, 6, h, w).contiguous(memory_format=fmt(channels_last))
            t = rnd(b, 10)
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                out = compiled(x, t)
            finally:
                torch.compiler.set_stance("default")
            assert rel_err(out, block(x, t)) < 1e-6
    hits = lyradynamo.compiled_graphs()[0].summary["matched"]["conv_bias"]
    assert hits == {"conv+bias+add->group_norm": 2, "conv+bias+residual(conv+bias)+scale": 1, "conv+bias": 1}
    assert _biased_convs_into_group_norm(graphs[0]) == []
    assert _adds_into_pre_bias(graphs[0]) == []
    # conv1 + temb -> norm2: the (B, C) embedding and conv1's (C,) bias as the two pre-biases
    # (and norm3's (C, 1, 1) shift with conv3's bias, both (C,))
    pre = {n.args[0].name: [(a.meta["example_value"].dim(), int(a.meta["example_value"].shape[-1])) for a in n.args[7:]]
           for n in graphs[0].nodes if n.target is lyra.group_norm.default and len(n.args) > 7}
    assert sorted(pre.values()) == [[(1, 12), (1, 12)], [(2, 12), (1, 12)]], pre  # (dims, C)


def test_residual_of_another_layout_is_not_fused(graphs):
    """y channels_last + r NCHW: eager's add picks the output layout; the pass leaves that add."""
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last).eval()

    def f(x, r):
        return conv(x) + r

    x = rnd(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    r = rnd(2, 8, 5, 5)
    with torch.no_grad():
        out = torch.compile(f, backend="lyra")(x, r)
        torch.testing.assert_close(out, f(x, r), rtol=1e-6, atol=1e-6)
        assert out.stride() == f(x, r).stride()
    assert lyradynamo.compiled_graphs()[0].summary["matched"]["conv_bias"] == {"conv+bias": 1}


def test_pass_can_be_switched_off():
    model = zoo.build_denoiser("sd15")
    passes = tuple(p for p in lyradynamo.config.ALL_PASSES if p != "conv_bias")
    with lyradynamo.config.patch(passes=passes), torch.no_grad():
        torch.compile(model, backend="lyra")(**zoo.denoiser_inputs("sd15", model))
    rec = lyradynamo.compiled_graphs()[0]
    assert "conv_bias" not in rec.summary["matched"]
    assert "lyra::bias_residual" not in rec.summary["op_histogram"]


# ---- lyra::group_norm(pre_bias=...) ------------------------------------------------------------

def _pre_bias(kind, n, c, dtype=torch.float32):
    return {"C": rnd(c, dtype=dtype), "NC": rnd(n, c, dtype=dtype), "1C": rnd(1, c, dtype=dtype)}[kind]


@pytest.mark.parametrize("kind", ["C", "NC", "1C"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 7), 3), ((3, 20, 3, 3), 4), ((1, 6, 1, 9), 2)])
def test_group_norm_pre_bias(kind, channels_last, act, shape, groups):
    n, c = shape[:2]
    x = rnd(*shape).contiguous(memory_format=fmt(channels_last))
    w, b = rnd(c), rnd(c)
    pb = _pre_bias(kind, n, c) * 3
    args = (x, groups, w, b, 1e-5, act, channels_last, pb)
    torch.library.opcheck(lyra.group_norm.default, args)
    ref = F.group_norm(x + pb.reshape(-1, c, 1, 1), groups, w, b, 1e-5)
    ref = F.silu(ref) if act == "silu" else ref
    out = lyra.group_norm(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.stride() == x.stride()
    # pre_bias=None is the op as before, bit for bit
    plain = lyra.group_norm(x, groups, w, b, 1e-5, act, channels_last, None)
    torch.testing.assert_close(plain, lyra.group_norm(x, groups, w, b, 1e-5, act, channels_last), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_pre_bias_low_precision_rounds_once(dtype, channels_last):
    """fp32 inside, one rounding: no further from the float64 result than eager in dtype."""
    x = (rnd(2, 24, 5, 7) * 2 + 1).to(dtype).contiguous(memory_format=fmt(channels_last))
    w, b, pb = rnd(24, dtype=dtype), rnd(24, dtype=dtype), (rnd(2, 24) * 4).to(dtype)
    out = lyra.group_norm(x, 4, w, b, 1e-5, "silu", channels_last, pb)
    exact = F.silu(F.group_norm(x.double() + pb.double()[:, :, None, None], 4, w.double(), b.double(), 1e-5))
    eager = F.silu(F.group_norm(x + pb[:, :, None, None], 4, w, b, 1e-5))
    assert out.dtype == dtype and out.stride() == x.stride()
    assert rel_err(out, exact) <= rel_err(eager, exact) + 1e-6
    # one rounding of the fp32 result
    f32 = F.silu(F.group_norm(x.float() + pb.float()[:, :, None, None], 4, w.float(), b.float(), 1e-5))
    torch.testing.assert_close(out, f32.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("kinds", [("NC", "C"), ("C", "NC"), ("1C", "C")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_two_pre_biases(kinds, channels_last):
    """x + (pre_bias + pre_bias2), the sum in fp32; a lone pre_bias2 acts as a lone pre_bias."""
    x = rnd(2, 12, 5, 7).contiguous(memory_format=fmt(channels_last))
    w, b = rnd(12), rnd(12)
    pb, pb2 = (_pre_bias(k, 2, 12) * 3 for k in kinds)
    args = (x, 3, w, b, 1e-5, "silu", channels_last, pb, pb2)
    torch.library.opcheck(lyra.group_norm.default, args)
    ref = F.silu(F.group_norm(x + pb.reshape(-1, 12, 1, 1) + pb2.reshape(-1, 12, 1, 1), 3, w, b, 1e-5))
    torch.testing.assert_close(lyra.group_norm(*args), ref, rtol=1e-5, atol=1e-5)
    alone = lyra.group_norm(x, 3, w, b, 1e-5, "silu", channels_last, None, pb2)
    torch.testing.assert_close(alone, lyra.group_norm(x, 3, w, b, 1e-5, "silu", channels_last, pb2), rtol=0, atol=0)
    # half precision: the two pre-biases summed in fp32 and added to x there, one rounding
    xh, wh, bh, pbh, pb2h = (t.half() for t in (x, w, b, pb, pb2))
    f32 = F.silu(F.group_norm(xh.float() + (pbh.float().reshape(-1, 12, 1, 1) + pb2h.float().reshape(-1, 12, 1, 1)),
                              3, wh.float(), bh.float(), 1e-5))
    out = lyra.group_norm(xh, 3, wh, bh, 1e-5, "silu", channels_last, pbh, pb2h)
    torch.testing.assert_close(out, f32.half(), rtol=0, atol=0)


def test_group_norm_pre_bias_bad_shape_names_it():
    x = rnd(2, 8, 3, 3)
    with pytest.raises(ValueError, match="pre_bias"):
        lyra.group_norm(x, 2, None, None, 1e-5, "none", False, rnd(3, 8))
    with pytest.raises(ValueError, match="pre_bias"):
        lyra.group_norm(x, 2, None, None, 1e-5, "none", False, rnd(7))
    with pytest.raises(ValueError, match="pre_bias"):
        lyra.group_norm(x, 2, None, None, 1e-5, "none", False, rnd(2, 8, 1))
    with pytest.raises(ValueError, match="pre_bias2"):
        lyra.group_norm(x, 2, None, None, 1e-5, "none", False, rnd(8), rnd(3, 8))


# ---- lyra::bias_residual ----------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias,with_res,scale", [(True, True, 1.0), (True, False, 1.0), (True, True, 0.5),
                                                      (False, True, 1 / 1.4142), (True, True, 1 / 3)])
@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (1, 3, 1, 1), (3, 5, 3, 9)])
def test_bias_residual(channels_last, with_bias, with_res, scale, shape):
    y = rnd(*shape).contiguous(memory_format=fmt(channels_last))
    bias = rnd(shape[1]) if with_bias else None
    res = rnd(*shape).contiguous(memory_format=fmt(channels_last)) if with_res else None
    torch.library.opcheck(lyra.bias_residual.default, (y, bias, res, scale))
    ref = y
    if bias is not None:
        ref = ref + bias.reshape(1, -1, 1, 1)
    if res is not None:
        ref = ref + res
    ref = ref * scale
    out = lyra.bias_residual(y, bias, res, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # fp32: eager's own op order
    assert out.stride() == y.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_residual_low_precision_rounds_once(dtype):
    y, r = rnd(2, 12, 5, 7, dtype=dtype), rnd(2, 12, 5, 7, dtype=dtype)
    bias = rnd(12, dtype=dtype)
    out = br_op.bias_residual(y, bias, r, 0.5)
    f32 = (y.float() + bias.float()[:, None, None] + r.float()) * 0.5
    torch.testing.assert_close(out, f32.to(dtype), rtol=0, atol=0)
    exact = (y.double() + bias.double()[:, None, None] + r.double()) * 0.5
    eager = (y + bias[:, None, None] + r) * 0.5
    assert rel_err(out, exact) <= rel_err(eager, exact)


def test_bias_residual_bad_arguments_name_them():
    y = rnd(2, 4, 3, 3)
    with pytest.raises(ValueError, match="bias"):
        lyra.bias_residual(y, rnd(5), None, 1.0)
    with pytest.raises(ValueError, match="residual"):
        lyra.bias_residual(y, None, rnd(2, 4, 3, 2), 1.0)
    with pytest.raises(ValueError, match="y must be"):
        lyra.bias_residual(rnd(4), None, None, 1.0)


def test_references_keep_layout_of_mixed_inputs():
    """The references (the CUDA fallback) accept a residual of another layout; the result has y's."""
    y = rnd(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    r = rnd(2, 8, 3, 5)
    out = br_op.bias_residual_reference(y, None, r, 1.0)
    assert out.stride() == y.stride()
    torch.testing.assert_close(out, y + r, rtol=0, atol=0)
    x = rnd(2, 8, 3, 5).transpose(2, 3)  # neither layout
    out = gn_op.group_norm_reference(x, 2, None, None, 1e-5, "none", False, rnd(8))
    assert out.is_contiguous()
