"""Float32 islands around 16-bit activations (Wan's blocks) fuse like FLUX's bf16 blocks:

- `(norm(x.float()) * (1 + scale) + shift).type_as(x)` -> one lyra::adaln reading x and
  writing x's dtype (out_dtype), float32 scale and shift read as they are: eager's values bit
  for bit on the CPU;
- `(x.float() + linear(h)[.float()] * gate).type_as(x)` -> lyra::linear with gate and residual,
  the (B, 1, N) gate cast to x's dtype: within bf16 rounding of eager (not bit for bit: eager
  rounds the linear's output to 16 bits before the gate, the fused epilogue does not);
- Wan's RoPE (`out[..., 0::2] = x1 * cos - x2 * sin` into an empty_like) -> lyra::qk_norm_rope:
  eager's values bit for bit with float32 tables.
What does not have the island's shape (a float32 result that stays float32, tables read at
other positions) keeps its eager ops."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
import more_models
from helpers import compiled_bitwise, rel_err

D, H = 64, 2
lyra = torch.ops.lyra


def _rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class IslandNorm(torch.nn.Module):
    """Wan's norm1 / norm2: a float32 LayerNorm of x.float(), modulated in float32 or affine."""

    def __init__(self, affine: bool, cast_back: bool = True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D, eps=1e-6, elementwise_affine=affine)
        self.cast_back = cast_back

    def forward(self, x, scale, shift):  # scale, shift: (B, D) float32
        y = self.norm(x.float())
        if not self.norm.elementwise_affine:
            y = y * (1 + scale[:, None]) + shift[:, None]
        return (y.type_as(x) if self.cast_back else y,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [False, True])
def test_norm_island_is_one_adaln_and_bitwise(dtype, affine):
    model = IslandNorm(affine).eval()  # float32 weights, as `_keep_in_fp32_modules` leaves them
    with torch.no_grad():
        if affine:
            model.norm.weight.copy_(1 + 0.1 * _rnd(D, seed=5))
            model.norm.bias.copy_(0.1 * _rnd(D, seed=6))
    x, scale, shift = 3 * _rnd(2, 9, D, dtype=dtype), 0.3 * _rnd(2, D, seed=1), _rnd(2, D, seed=2)
    rec = compiled_bitwise(model, x, scale, shift)
    label = "layer_norm(float32 island)" if affine else "layer_norm+(1+scale)+shift(float32 island)"
    assert rec.summary["matched"]["adaln"] == {label: 1}
    hist = rec.summary["op_histogram"]
    assert not any(k in hist for k in (".float", ".type_as", "mul", "add")), hist


def test_norm_whose_float32_result_stays_float32_is_no_island():
    x, scale, shift = _rnd(2, 9, D, dtype=torch.bfloat16), _rnd(2, D, seed=1), _rnd(2, D, seed=2)
    rec = compiled_bitwise(IslandNorm(False, cast_back=False).eval(), x, scale, shift)
    assert rec.summary["matched"]["adaln"] == {"layer_norm+(1+scale)+shift": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("params", ["modulated", "affine", "16-bit modulation"])
def test_adaln_out_dtype_is_the_island_of_x_float(dtype, kind, params):
    x = 3 * _rnd(2, 9, 40, dtype=dtype)
    w = b = mul = add = None
    if params == "affine":
        w, b = 1 + 0.1 * _rnd(40, seed=3), (0.1 * _rnd(40, seed=4) if kind == "layer" else None)
    else:
        pdt = dtype if params == "16-bit modulation" else torch.float32
        mul, add = (0.3 * _rnd(2, 1, 40, seed=1)).to(pdt), _rnd(2, 1, 40, seed=2).to(pdt)
    offset = 1.0 if mul is not None else 0.0
    args = (x, w, b, mul, add, kind, 1e-6, offset, dtype)
    torch.library.opcheck(lyra.adaln.default, args)
    out = lyra.adaln(*args)
    if kind == "layer":
        ref = F.layer_norm(x.float(), (40,), w, b, 1e-6)
    else:
        ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = ref * w if w is not None else ref
    if mul is not None:
        ref = ref * (1 + mul) + add
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


class GatedResidual(torch.nn.Module):
    """Wan's gated residuals: attention's `(x.float() + to_out(h) * gate)` and the ffn's
    `(x.float() + ffn(h).float() * gate)`, each cast back to x's dtype."""

    def __init__(self, ffn_cast: bool):
        super().__init__()
        self.proj = torch.nn.Linear(D, D)
        self.ffn_cast = ffn_cast

    def forward(self, x, h, gate):  # gate: (B, D)
        y = self.proj(h)
        y = y.float() if self.ffn_cast else y
        return ((x.float() + y * gate[:, None]).type_as(x),)


@pytest.mark.parametrize("ffn_cast", [False, True])
def test_gated_residual_island_is_one_linear(ffn_cast):
    torch.manual_seed(0)
    model = GatedResidual(ffn_cast).to(torch.bfloat16).eval()
    x, h = _rnd(2, 9, D, dtype=torch.bfloat16), _rnd(2, 9, D, dtype=torch.bfloat16, seed=1)
    gate = _rnd(2, D, seed=2)  # float32, as Wan's modulation table makes it
    lyradynamo.reset_stats()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="lyra")(x, h, gate)[0]
        ref = model(x, h, gate)[0]
        ref64 = (x.double() + F.linear(h.double(), model.proj.weight.double(), model.proj.bias.double())
                 * gate[:, None].double())
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.summary["matched"]["linear"] == {"linear+gate(float32 island)+residual": 1}
    hist = rec.summary["op_histogram"]
    assert hist.get(".to") == 1 and not any(k in hist for k in (".float", ".type_as", "mul", "add")), hist
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, ref64) <= 2 * rel_err(ref, ref64) + 1e-3


def test_gate_of_16_bits_is_no_island():
    """A bf16 gate promotes nothing: the ordinary gate + residual match (x + y * gate)."""
    model = GatedResidual(False).to(torch.bfloat16).eval()
    x, h = _rnd(2, 9, D, dtype=torch.bfloat16), _rnd(2, 9, D, dtype=torch.bfloat16, seed=1)
    rec = compiled_bitwise(model, x, h, _rnd(2, D, dtype=torch.bfloat16, seed=2))
    assert "linear+gate(float32 island)+residual" not in rec.summary["matched"].get("linear", {})


def _wan_rope(x, freqs_cos, freqs_sin, cos_at=0):
    """diffusers' WanAttnProcessor apply_rotary_emb; cos_at=1 reads cos at odd positions
    (not Wan's: no match)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., cos_at::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanRope(torch.nn.Module):
    def __init__(self, cos_at=0):
        super().__init__()
        self.cos_at = cos_at

    def forward(self, q, k, angles):  # angles (L, D / 2): (1, L, 1, D) tables made as Wan's rope does
        freqs_cos = angles.cos().repeat_interleave(2, -1)[None, :, None, :]
        freqs_sin = angles.sin().repeat_interleave(2, -1)[None, :, None, :]
        return (_wan_rope(q, freqs_cos, freqs_sin, self.cos_at), _wan_rope(k, freqs_cos, freqs_sin, self.cos_at))


def _angles(length):
    return _rnd(length, D // 2, seed=7) * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_wan_rope_is_qk_norm_rope_bitwise(dtype):
    q, k = _rnd(2, 11, H, D, dtype=dtype), _rnd(2, 11, H, D, dtype=dtype, seed=1)
    rec = compiled_bitwise(WanRope().eval(), q, k, _angles(11))
    assert rec.summary["matched"]["rope"] == {"rope(split pairs)": 2}
    hist = rec.summary["op_histogram"]
    # the tables pair-repeated once (2 more repeat_interleaves), not per rope
    assert hist.get("lyra::qk_norm_rope") == 2 and hist.get(".repeat_interleave") == 4, hist
    assert not any(k in hist for k in ("mul", "sub", "setitem", "empty_like")), hist


def test_wan_rope_reading_other_positions_is_no_match():
    q, k = _rnd(2, 11, H, D), _rnd(2, 11, H, D, seed=1)
    rec = compiled_bitwise(WanRope(cos_at=1).eval(), q, k, _angles(11))
    assert "rope" not in rec.summary["matched"]


@pytest.mark.parametrize("keep_fp32", [True, False], ids=["fp32 tables and norms", "all bf16"])
def test_tiny_wan_in_bf16_fuses_its_islands(keep_fp32):
    """The tiny Wan of tests/more_models.py in bf16: every island fused, within bf16 rounding of
    eager, as close to fp32 eager as bf16 eager is (2x rule)."""
    model = more_models.build("wan", dtype=torch.bfloat16)
    if keep_fp32:
        more_models.keep_in_fp32(model)
    ref32 = more_models.build("wan", dtype=torch.float32)
    lyradynamo.reset_stats()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for i, shape in enumerate([(2, 8, 8, 12), (1, 8, 12, 20)]):
            kwargs = more_models.inputs("wan", *shape, dtype=torch.bfloat16, seed=i)
            out = more_models.call_compiled(compiled, kwargs, recompile_is_error=i > 0)
            ref = more_models.first_output(model(**kwargs))
            fp32 = more_models.first_output(ref32(**more_models.inputs("wan", *shape, seed=i)))
            assert rel_err(out, ref) < 2e-2
            assert rel_err(out, fp32) <= 2 * rel_err(ref, fp32) + 1e-3
    (rec,) = lyradynamo.compiled_graphs()
    matched = rec.summary["matched"]
    assert matched["adaln"]["layer_norm+(1+scale)+shift(float32 island)"] == 5  # norm1, norm3 x 2, norm_out
    assert matched["adaln"]["layer_norm(float32 island)"] == 2  # norm2 (affine)
    assert matched["linear"]["linear+gate(float32 island)+residual"] == 4
    assert matched["rope"] == {"rope(split pairs)": 4}
