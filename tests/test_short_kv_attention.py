"""lyra's short-KV attention (csrc/attention_short_kv.cu, 16-bit output) on the CPU, without the
compiled library: the dispatch rule against the H100 measurements it comes from, the wiring of
lyra::attention's CUDA path (config.short_kv_attention, attention_backend), the refusals of
`unsupported` with their reasons, the config option and the dump's line.
tests/cuda/test_short_kv_attention_cuda.py runs the kernel."""
import importlib.util
import json
import os

import pytest
import torch

import lyradynamo
from lyradynamo import config, dump
from lyradynamo.ops import attention as attention_mod
from lyradynamo.ops import attention_short_kv as skv
from lyradynamo.ops.attention import attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_F = os.path.join(ROOT, "benchmarks", "results", "h100-2026-11-27-s19-runF-short-kv-probe-v3.json")
g = torch.Generator().manual_seed(5)


class Lib:  # a library with the kernel (its entry is never called here)
    attention_short_kv = None


def _probe_shapes() -> dict:
    path = os.path.join(ROOT, "benchmarks", "short_kv_probe.py")
    spec = importlib.util.spec_from_file_location("short_kv_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SHAPES


def test_auto_rule_takes_exactly_the_shapes_measured_at_least_as_fast_as_cudnn():
    """Session 19 run F (H100, fp16): the kernel where short_kv <= sdpa, i.e. every SD1.5 shape
    and sdxl-l2, not sdxl-l1; the probe still times the same shapes."""
    with open(RUN_F) as f:
        rows = {r["shape"]: r for r in json.load(f)}
    shapes = _probe_shapes()
    assert set(rows) == set(shapes)
    taken = set()
    for name, (b, lq, lk, h, d) in shapes.items():
        r = rows[name]
        assert (r["B"], r["Lq"], r["Lk"], r["H"], r["D"]) == (b, lq, lk, h, d)
        assert skv.prefer("auto", b, lq, h) == (r["short_kv"] <= r["sdpa"]), r
        assert not skv.prefer("off", b, lq, h)
        if skv.prefer("auto", b, lq, h):
            taken.add(name)
    assert taken == {"sdxl-l2", "sd15-l1", "sd15-l2", "sd15-l3", "sd15-mid"}


def test_rule_counts_query_rows_times_heads_per_call():
    assert skv.prefer("auto", 1, 65536, 1) and not skv.prefer("auto", 1, 65537, 1)
    assert skv.prefer("auto", 1, 4096, 10)  # sdxl-l1 at batch 1: 40960 pairs, as sdxl-l2 at batch 2
    assert not skv.prefer("auto", 4, 4096, 8)  # sd15-l1 at batch 4


def _blhd(b, lq, lk, h, d, dtype=torch.float16):
    q = torch.randn(b, lq, h, d, generator=g).to(dtype)
    k = torch.randn(b, lk, h, d, generator=g).to(dtype)
    v = torch.randn(b, lk, h, d, generator=g).to(dtype)
    return q, k, v


def test_unsupported_names_each_reason():
    """Every refusal says what it refuses. The tensors are on the CPU: the device check comes
    last, so a CPU input the kernel would otherwise take is refused for its device alone."""
    q, k, v = _blhd(2, 9, 77, 4, 64)
    assert "CUDA device" in skv.unsupported(q, k, v, C=Lib)
    assert "csrc not built" in skv.unsupported(q, k, v, C=None)
    assert "csrc not built" in skv.unsupported(q, k, v, C=object())
    assert "layout 'bhld'" in skv.unsupported(q, k, v, layout="bhld", C=Lib)
    assert "mask" in skv.unsupported(q, k, v, attn_mask=torch.zeros(9, 77), C=Lib)
    assert "causal" in skv.unsupported(q, k, v, is_causal=True, C=Lib)
    assert "float32" in skv.unsupported(q.float(), k.float(), v.float(), C=Lib)
    assert "float16" in skv.unsupported(q, k.bfloat16(), v.bfloat16(), C=Lib)
    q2, k2, v2 = _blhd(2, 9, 129, 4, 64)
    assert "129 keys (the kernel takes 1..128)" in skv.unsupported(q2, k2, v2, C=Lib)
    q3, k3, v3 = _blhd(2, 9, 77, 4, 72)
    assert "head dim 72" in skv.unsupported(q3, k3, v3, C=Lib)
    assert "same B, H, D" in skv.unsupported(q, k[:, :, :2], v[:, :, :2], C=Lib)
    assert "4-D" in skv.unsupported(q, k, v[:, :5], C=Lib)
    # strides: D not unit-stride; heads not D apart; a k row stride that is no multiple of 8
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert "q's strides" in skv.unsupported(qt, k, v, C=Lib)
    kh = torch.randn(2, 77, 4, 72, generator=g).half()[..., :64]
    assert "k's strides" in skv.unsupported(q, kh, v, C=Lib)
    kr = torch.randn(2, 77, 4 * 64 + 4, generator=g).half()[..., :256].unflatten(-1, (4, 64))
    assert "k's strides" in skv.unsupported(q, kr, v, C=Lib) and "multiples of 8" in skv.unsupported(q, kr, v, C=Lib)
    # a k / v view off a 16-byte boundary (copied in 16-byte pieces)
    kv = torch.randn(2, 77, 4 * 64 + 8, generator=g).half()
    ko = kv[..., 4:260].unflatten(-1, (4, 64))
    assert "k's address is not 16-byte aligned" in skv.unsupported(q, ko, v, C=Lib)


def test_unsupported_takes_what_the_projections_give():
    """k / v as column slices of one grouped (B, Lk, 2 * H * D) projection, q of one row, a
    single key, batch 1: only the device is refused."""
    kv = torch.randn(1, 1, 2 * 4 * 40, generator=g).half()
    k, v = kv[..., :160].unflatten(-1, (4, 40)), kv[..., 160:].unflatten(-1, (4, 40))
    q = torch.randn(1, 1, 4, 40, generator=g).half()
    assert "CUDA device" in skv.unsupported(q, k, v, C=Lib)


@pytest.fixture
def fake_kernel(monkeypatch):
    """lyra::attention's CUDA path with a library that 'has' the kernel: calls recorded, the
    kernel's output faked by the reference; the device check passed."""
    calls = []
    real = skv.unsupported

    def unsupported(*args, **kwargs):  # CPU tensors stand for CUDA ones
        why = real(*args, **kwargs)
        return None if why == "q, k and v must be on one CUDA device" else why

    def run(C, q, k, v, scale):
        calls.append(tuple(q.shape))
        return skv.reference(q, k, v, scale)

    monkeypatch.setattr(attention_mod, "csrc", lambda: Lib)
    monkeypatch.setattr(skv, "unsupported", unsupported)
    monkeypatch.setattr(skv, "run", run)
    return calls


def test_attention_takes_the_kernel_by_rule_and_config(fake_kernel):
    short = _blhd(2, 256, 77, 8, 160)  # sd15-l3
    big = _blhd(2, 4096, 77, 10, 64)  # sdxl-l1: cuDNN
    self_attn = _blhd(2, 64, 256, 8, 64)  # 256 keys: cuDNN
    run = attention_mod._short_kv
    out = run(*short, None, None, False, "blhd", "auto")
    assert fake_kernel == [(2, 256, 8, 160)] and out.shape == (2, 256, 8, 160)
    assert run(*big, None, None, False, "blhd", "auto") is None
    assert run(*self_attn, None, None, False, "blhd", "auto") is None
    assert run(*short, None, None, False, "blhd", "off") is None
    assert run(*short, torch.zeros(256, 77), None, False, "blhd", "auto") is None
    q, k, v = short
    assert run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, False, "bhld", "auto") is None
    assert fake_kernel == [(2, 256, 8, 160)]


def test_reference_is_float32_attention_rounded_once():
    q, k, v = _blhd(2, 33, 77, 3, 40, torch.bfloat16)
    ref = skv.reference(q, k, v, 0.3)
    assert ref.dtype == torch.bfloat16 and ref.shape == (2, 33, 3, 40)
    assert torch.equal(ref, attention_reference(q.float(), k.float(), v.float(), None, 0.3, False, "blhd").bfloat16())
    assert torch.equal(skv.reference(q, k[:, :1], v[:, :1], None), v[:, :1].expand(2, 33, 3, 40))  # one key: v


def test_option_values_and_doc():
    assert config.short_kv_attention == "auto"
    with config.patch(short_kv_attention="off"):
        assert config.short_kv_attention == "off"
    with pytest.raises(config.LyraConfigError, match="allowed values: 'auto', 'off'"):
        config.short_kv_attention = "on"
    line = next(s for s in config.describe().splitlines() if s.startswith("short_kv_attention"))
    assert "2^16 (query row, head) pairs" in line and "quant" not in line
    assert config.extended_dict_tags is True  # main's option, kept


def test_dump_names_the_kernel_where_it_can_run(monkeypatch):
    import lyradynamo.ops as ops

    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.lyra.attention.default(q, k, v, None, None, False, "blhd"))
    monkeypatch.setattr(ops, "csrc_status", lambda: "built")
    assert "attention_short_kv.cu" in dump.kernel_paths(gm, "cuda")["attention"]
    for cfg in (dict(short_kv_attention="off"), dict(attention_backend="cudnn")):
        with lyradynamo.config.patch(**cfg):
            assert dump.kernel_paths(gm, "cuda")["attention"].startswith("torch SDPA")
    monkeypatch.setattr(ops, "csrc_status", lambda: "csrc not built (test)")
    assert dump.kernel_paths(gm, "cuda")["attention"].startswith("torch SDPA")
