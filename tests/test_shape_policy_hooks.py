"""The shape policy's settings are patched per compilation, not per call: Dynamo enters
`policy_context` around every call of a lyra frame, so that must cost (almost) nothing."""
import torch

import lyradynamo
from lyradynamo import shape_policy


def test_call_context_leaves_config_alone_compile_sees_policy():
    torch._dynamo.reset()  # clears Dynamo's compile callbacks: the policy must re-register
    seen = {}

    @torch._dynamo.disable
    def probe():
        seen["assume_static_in_call"] = torch._dynamo.config.assume_static_by_default

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            probe()
            return self.lin(x)

    m = M()
    compiled = torch.compile(m, backend="lyra")
    with torch.no_grad():
        for n in (3, 5, 1):
            x = torch.randn(n, 8)
            torch.testing.assert_close(compiled(x), m(x))
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.policy_active  # the compilation ran under the policy
    assert lyradynamo.compile_count() == 1  # batch 3, 5 and 1: one compilation
    # a steady call runs with torch's own setting: the policy is not patched around it
    assert seen["assume_static_in_call"] is torch._dynamo.config.assume_static_by_default is True
    assert not shape_policy._settings and not shape_policy._compiles_patched


def test_context_alone_patches_nothing_while_hooked():
    with shape_policy.policy_context():
        assert torch._dynamo.config.assume_static_by_default is True
        assert shape_policy._active == 1
    assert shape_policy._active == 0
