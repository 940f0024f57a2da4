"""quant.host_copy.to_host: the staged GPU -> host copy is exact, for any size and chunking."""
import pytest
import torch

from lyradynamo.quant import host_copy

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (513, 77), (1027, 3001), (0, 4)])
@pytest.mark.parametrize("stage_bytes", [64, 4096, host_copy.STAGE_BYTES])
def test_to_host_exact(dtype, shape, stage_bytes):
    g = torch.Generator(device="cuda").manual_seed(hash((shape, stage_bytes)) & 0xFFFF)
    t = torch.randn(shape, device="cuda", generator=g).to(dtype)
    host = host_copy.to_host(t, stage_bytes=stage_bytes)
    assert host.device.type == "cpu" and host.dtype == dtype and host.shape == t.shape
    assert host.is_contiguous() and not host.is_pinned()
    assert torch.equal(host.view(torch.uint8), t.cpu().view(torch.uint8))


def test_to_host_non_contiguous_and_after_pending_work():
    a = torch.randn(2048, 3000, device="cuda", dtype=torch.bfloat16)
    t = a.t()  # non-contiguous source
    b = (a * 2).t()  # produced by a kernel still possibly in flight on the current stream
    assert torch.equal(host_copy.to_host(t, stage_bytes=1 << 20), t.cpu())
    assert torch.equal(host_copy.to_host(b, stage_bytes=1 << 20), b.cpu())
