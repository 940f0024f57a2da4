"""lyradynamo/fake_shortcuts.py: Dynamo's fake runs of linear / layer_norm / group_norm /
size-keeping conv2d / eval-mode dropout answered from the operands while lyra traces; everything
it cannot answer exactly runs in full. (Every shortcut taken in the test suite is also checked
against the full run: fake_shortcuts.CHECK.)"""
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import lyradynamo
from lyradynamo import fake_shortcuts, zoo


def test_shortcuts_are_taken_when_lyra_traces(monkeypatch):
    taken = []
    for fn, impl in list(fake_shortcuts._SHORTCUTS.items()):
        def counting(args, kwargs, cls, _impl=impl, _fn=fn):
            v = _impl(args, kwargs, cls)
            if v is not None:
                taken.append(_fn)
            return v
        monkeypatch.setitem(fake_shortcuts._SHORTCUTS, fn, counting)
    model = zoo.build_denoiser("sdxl")
    with torch.no_grad():
        torch.compile(model, backend="lyra")(**zoo.denoiser_inputs("sdxl", model))
    assert lyradynamo.compile_count() == 1
    names = {getattr(f, "__name__", str(f)) for f in taken}
    assert {"linear", "layer_norm", "group_norm", "conv2d", "dropout"} <= names, names


def test_what_is_not_answered_runs_in_full():
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 5, 8))
        w = mode.from_tensor(torch.randn(4, 8))
        w16 = mode.from_tensor(torch.randn(4, 8, dtype=torch.float16))
        b = mode.from_tensor(torch.randn(4))
        with torch.no_grad():
            out = fake_shortcuts._linear_value((x, w, b), {}, FakeTensor)
            assert tuple(out.shape) == (2, 5, 4) and out.dtype == torch.float32 and out.is_contiguous()
            assert fake_shortcuts._linear_value((x, w16), {}, FakeTensor) is None  # mixed dtypes
            assert fake_shortcuts._linear_value((x, w.t()), {}, FakeTensor) is None  # widths differ
            assert fake_shortcuts._layer_norm_value((x, (8,)), {}, FakeTensor) is not None
            assert fake_shortcuts._layer_norm_value((x, (5, 8)), {"eps": 1e-6}, FakeTensor) is not None
            assert fake_shortcuts._layer_norm_value((x, (4,)), {}, FakeTensor) is None  # wrong shape
        w_grad = mode.from_tensor(torch.randn(4, 8, requires_grad=True))
        with torch.enable_grad():
            assert fake_shortcuts._linear_value((x, w_grad), {}, FakeTensor) is None  # autograd
    real = torch.randn(2, 8)
    assert fake_shortcuts._linear_value((real, torch.randn(4, 8)), {}, FakeTensor) is None  # not fake
    assert F.linear is fake_shortcuts._LINEARS[1]


def test_group_norm_conv_and_dropout_answers_and_what_runs_in_full():
    with FakeTensorMode() as mode, torch.no_grad():
        x = mode.from_tensor(torch.randn(2, 8, 6, 5))
        xl = mode.from_tensor(torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last))
        w3 = mode.from_tensor(torch.randn(4, 8, 3, 3))
        w3l = mode.from_tensor(torch.randn(4, 8, 3, 3).to(memory_format=torch.channels_last))
        w1 = mode.from_tensor(torch.randn(4, 8, 1, 1))  # contiguous and channels_last at once
        b = mode.from_tensor(torch.randn(4))
        g, gb = mode.from_tensor(torch.randn(8)), mode.from_tensor(torch.randn(8))
        for t in (x, xl):  # group_norm: the input's shape and layout
            for affine in ((g, gb), (None, None)):
                out = fake_shortcuts._group_norm_value((t, 4, *affine), {}, FakeTensor)
                ref = F.group_norm(t, 4, *affine)
                assert out.shape == ref.shape and out.stride() == ref.stride()
        assert fake_shortcuts._group_norm_value((xl, 4, g, gb), {}, FakeTensor).stride() == xl.stride()
        assert fake_shortcuts._group_norm_value((x, 3, None, None), {}, FakeTensor) is None  # 8 % 3
        assert fake_shortcuts._group_norm_value((x[:, :, ::2], 4), {}, FakeTensor) is None  # strided
        for t, w in ((x, w3), (xl, w3l)):  # conv2d keeping the size, one shared layout
            out = fake_shortcuts._conv2d_value((t, w, b, 1, 1), {}, FakeTensor)
            ref = F.conv2d(t, w, b, 1, 1)
            assert out.shape == ref.shape and out.stride() == ref.stride()
            assert fake_shortcuts._memory_format(out) == fake_shortcuts._memory_format(t)  # read back
        assert fake_shortcuts._conv2d_value((x, w3, b), {"padding": "same"}, FakeTensor) is not None
        assert fake_shortcuts._conv2d_value((x, w3, b, 2, 1), {}, FakeTensor) is None  # stride 2
        assert fake_shortcuts._conv2d_value((x, w3, b, 1, 0), {}, FakeTensor) is None  # shrinks
        assert fake_shortcuts._conv2d_value((xl, w3, b, 1, 1), {}, FakeTensor) is None  # layouts differ
        assert fake_shortcuts._conv2d_value((x, w1, b), {}, FakeTensor) is None  # ambiguous weight
        assert fake_shortcuts._dropout_value((x, 0.1, False), {}, FakeTensor) is x
        assert fake_shortcuts._dropout_value((x,), {"p": 0.0, "training": True}, FakeTensor) is x
        assert fake_shortcuts._dropout_value((x, 0.1, True), {}, FakeTensor) is None  # random
        assert fake_shortcuts._dropout_value((x, 0.1, False, True), {}, FakeTensor) is None  # in place


def test_group_norm_on_cuda_fakes_is_contiguous_as_torch_writes_it():
    """On CUDA, torch's group_norm is contiguous whatever x's layout (a shortcut that kept
    channels_last failed every UNet test on the GPU, session 30 run A). Fake CUDA tensors need no
    GPU."""
    with FakeTensorMode(), torch.no_grad():
        xl = torch.empty(2, 8, 6, 5, device="cuda").to(memory_format=torch.channels_last)
        g = torch.empty(8, device="cuda")
        for affine in ((g, g), (None, None)):
            out = fake_shortcuts._group_norm_value((xl, 4, *affine), {}, FakeTensor)
            ref = F.group_norm(xl, 4, *affine)
            assert out.device == ref.device and out.shape == ref.shape and out.stride() == ref.stride()
            assert out.is_contiguous()


class _Views(torch.nn.Module):
    def forward(self, x):  # (B, N, 8)
        b, n, c = x.shape
        q, k = x.chunk(2, dim=-1)
        h = q.view(b, n, 2, 2).transpose(1, 2) + k.view(b, n, 2, 2).permute(0, 2, 1, 3)
        h = torch.cat([h[:, :1], h[:, 1:]], dim=1).transpose(1, 2)
        return h.reshape(b, n, 4) * 2.0 + 1.0


def test_view_ops_trace_past_the_fake_tensor_cache(monkeypatch):
    """While lyra traces, Dynamo's fake runs of view ops and reshape skip torch's fake-tensor cache
    (its hits rebuild a view with symbolic size arithmetic, its misses make and check an entry:
    slower than the run); elementwise ops and cat keep it."""
    from torch._dynamo import utils as dynamo_utils

    cached, inside = [], []
    real_cached = FakeTensorMode._cached_dispatch_impl

    def recording(self, func, *args, **kwargs):
        if inside:
            cached.append(func)
        return real_cached(self, func, *args, **kwargs)

    lyra_run_node = dynamo_utils.run_node

    def run_node(*args, **kwargs):
        inside.append(1)
        try:
            return lyra_run_node(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(FakeTensorMode, "_cached_dispatch_impl", recording)
    monkeypatch.setattr(dynamo_utils, "run_node", run_node)
    model = _Views()
    x = torch.randn(2, 6, 8)
    out = torch.compile(model, backend="lyra")(x)
    torch.testing.assert_close(out, model(x))
    ops = {str(f.overloadpacket) for f in cached}
    assert not ops & {"aten.transpose", "aten.permute", "aten.view", "aten.split", "aten.slice",
                      "aten._unsafe_view"}, ops
    # elementwise ops still go through the cache, and so does cat (torch 2.11's uncached
    # channels_last flags differ from its cached ones)
    assert {"aten.add", "aten.mul", "aten.cat"} <= ops, ops


def test_ops_past_the_cache_give_what_its_hits_give():
    """For the ops lyra runs past the fake-tensor cache: the uncached run and a cache hit agree on
    sizes, strides and contiguity flags (symbolic sizes, channels_last inputs; CUDA fakes where
    torch is a CUDA build). conv2d and cat keep the cache: a script with torch 2.11's CUDA fakes
    found their uncached channels_last flags differ from a hit's (benchmarks/NOTES.md, session 32;
    this test's setting does not reproduce that, so they are not listed here)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=env)
    b, h, w = (env.create_symintnode(env.create_symbol(n, ConstantSource(s), dynamic_dim=DimDynamic.DYNAMIC), hint=n)
               for n, s in ((2, "b"), (8, "h"), (8, "w")))
    cl = torch.channels_last

    def meta(t):
        if isinstance(t, (list, tuple)):
            return [meta(x) for x in t]
        return t.shape, t.stride(), t.is_contiguous(), t.dim() == 4 and t.is_contiguous(memory_format=cl)

    with mode, torch.no_grad():
        dev = "cuda" if torch.backends.cuda.is_built() else "cpu"  # CUDA fakes need a CUDA build
        x = torch.empty(b, 32, h, w, device=dev, dtype=torch.float16, memory_format=cl)
        g, lw = torch.empty(32, device=dev, dtype=torch.float16), torch.empty(16, 32, device=dev, dtype=torch.float16)
        runs = {"transpose": lambda t: t.flatten(2).transpose(1, 2), "permute": lambda t: t.permute(0, 2, 3, 1),
                "view": lambda t: t.permute(0, 2, 3, 1).view(b, h * w, 32), "chunk": lambda t: t.chunk(2, dim=1),
                "split": lambda t: t.split(16, dim=1), "getitem": lambda t: t[:, :16],
                "expand": lambda t: t[:1].expand(b, 32, h, w), "squeeze": lambda t: t[:, :1].squeeze(1),
                "reshape": lambda t: t.permute(0, 2, 3, 1).reshape(b, h * w, 32),
                "interpolate": lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"),
                "group_norm": lambda t: F.group_norm(t, 8, g, g), "layer_norm": lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (32,)),
                "linear": lambda t: F.linear(t.flatten(2).transpose(1, 2).contiguous(), lw)}
        for x_in in (x, F.silu(x)):  # the same layout made two ways
            for name, run in runs.items():
                mode.cache_enabled = False
                uncached = meta(run(x_in))
                mode.cache_enabled = True
                run(x_in)  # a miss fills the cache
                assert meta(run(x_in)) == uncached, name
    listed = {*fake_shortcuts._UNCACHED_METHODS,
              *(getattr(f, "__name__", str(f)) for f in fake_shortcuts._UNCACHED_FUNCTIONS)}
    assert listed <= set(runs), listed - set(runs)  # every op lyra lists is checked above
