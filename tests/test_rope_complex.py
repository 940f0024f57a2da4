"""RoPE written as a complex product (Qwen-Image's `apply_rotary_emb_qwen(use_real=False)`):

    out = view_as_real(view_as_complex(x.float().reshape(B, L, H, -1, 2)) * f.unsqueeze(1))
          .flatten(3).type_as(x)

is lyra::qk_norm_rope with cos = Re f and sin = Im f repeated pairwise (tables made once per
graph), the q / k RMSNorm before it folded in; a joint attention's `cat([rope_txt, rope_img],
dim=1)` of two such ops becomes one op over both parts (the tables concatenated once, the cat
copy gone). On the CPU the result is eager's bit for bit, in float32 and bfloat16. A product
that is not this rotation (a table broadcast over L) keeps its eager ops."""
import pytest
import torch

from helpers import compiled_bitwise

D, H = 64, 2


def _rnd(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _freqs(length, seed=7):
    """(L, D / 2) complex64 table: unit rotations, as Qwen-Image's pos_embed makes them."""
    return torch.polar(torch.ones(length, D // 2), _rnd(length, D // 2, seed=seed) * 3)


def _qwen_rope(x, freqs):
    x_rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_rotated * freqs.unsqueeze(1)).flatten(3).type_as(x)


def _rms(dtype):
    """diffusers' RMSNorm (Qwen-Image's norm_q / norm_k), with a weight that is not all ones."""
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * _rnd(D, seed=3))
    return norm


class JointRope(torch.nn.Module):
    """Qwen-Image's attention before SDPA: per-stream q / k norms and RoPE, then text + image
    joined along the sequence (joint=True), or the image stream's alone."""

    def __init__(self, dtype, joint=True):
        super().__init__()
        self.joint = joint
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (_rms(dtype) for _ in range(4))

    def forward(self, q, k, tq, tk, img_freqs, txt_freqs):
        q, k = _qwen_rope(self.norm_q(q), img_freqs), _qwen_rope(self.norm_k(k), img_freqs)
        if not self.joint:
            return q, k
        tq, tk = _qwen_rope(self.norm_added_q(tq), txt_freqs), _qwen_rope(self.norm_added_k(tk), txt_freqs)
        return torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1)


def _inputs(dtype, L=11, T=5):
    return (_rnd(2, L, H, D, dtype=dtype), _rnd(2, L, H, D, dtype=dtype, seed=1), _rnd(2, T, H, D, dtype=dtype, seed=2),
            _rnd(2, T, H, D, dtype=dtype, seed=4), _freqs(L), _freqs(T, seed=8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_complex_rope_with_its_norm_is_qk_norm_rope_bitwise(dtype):
    rec = compiled_bitwise(JointRope(dtype, joint=False).eval(), *_inputs(dtype))
    assert rec.summary["matched"]["rope"] == {"rope(complex)+rms_norm": 2}
    hist = rec.summary["op_histogram"]
    # cos and sin made once from the one table (2 repeat_interleaves), not per rope; no norm left
    assert hist.get("lyra::qk_norm_rope") == 2 and hist.get(".repeat_interleave") == 2, hist
    assert not any(k in hist for k in ("view_as_complex", "mul", "lyra::adaln", ".type_as")), hist


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_joint_complex_ropes_fold_their_cat(dtype):
    rec = compiled_bitwise(JointRope(dtype).eval(), *_inputs(dtype))
    assert rec.summary["matched"]["rope"] == {"rope(complex)+rms_norm": 4, "joined ropes (2 -> 1, cat folded)": 2}
    hist = rec.summary["op_histogram"]
    # one op per joined q / k; the only cats left join the two streams' tables (cos, sin), once
    assert hist.get("lyra::qk_norm_rope") == 2 and hist.get("cat") == 2, hist


def test_a_table_broadcast_over_the_sequence_is_no_match():
    """f of shape (1, D / 2) rotates every position alike: not the (L, D / 2) table the op takes."""

    class Broadcast(torch.nn.Module):
        def forward(self, q, f):
            return _qwen_rope(q, f)

    rec = compiled_bitwise(Broadcast().eval(), _rnd(2, 11, H, D), _freqs(1))
    assert "rope" not in rec.summary["matched"]
    assert rec.summary["op_histogram"].get("view_as_complex") == 1
