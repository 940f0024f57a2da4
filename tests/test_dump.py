"""The graph dump: files per graph, summary with matches and reasons, a picture, the CLI."""
import json
import os

import torch

import lyradynamo
from lyradynamo import dump, zoo


def test_dump_dir_writes_before_after_summary_and_picture(tmp_path):
    model = zoo.build_denoiser("sd15")
    with lyradynamo.config.patch(dump_dir=str(tmp_path)), torch.no_grad():
        torch.compile(model, backend="lyra")(**zoo.denoiser_inputs("sd15", model))
    g = tmp_path / "graph_0"
    for f in ("before.py", "after.py", "summary.txt", "summary.json", "graph.html"):
        assert (g / f).stat().st_size > 0, f
    before, after = (g / "before.py").read_text(), (g / "after.py").read_text()
    assert "torch._C._nn.linear" in before and "torch.ops.lyra.linear" in after
    s = json.loads((g / "summary.json").read_text())
    assert s["coverage"]["linear"]["left"] == 0 and s["matched"]["group_norm"]
    assert "kernel_paths" in s and s["kernel_paths"]["linear"].startswith("PyTorch reference")
    html = (g / "graph.html").read_text()
    assert "#b7f0b1" in html and "lyra::group_norm" in html  # rewritten nodes stand out


def test_env_var_sets_dump_dir(tmp_path):
    """In a fresh process: reloading lyradynamo.config in this one would leave modules holding
    the old config object while later tests patch the new one."""
    import subprocess
    import sys

    env = {**os.environ, "LYRA_DUMP_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import lyradynamo; print(lyradynamo.config.dump_dir)"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == str(tmp_path)


def test_cli_prints_summary(capsys):
    assert dump.main(["--model", "flux-tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "anchor ops rewritten" in out and "linear" in out and "compiled graphs: 1" in out


def test_left_anchor_reported_with_reason():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm((4, 8))  # normalises two dims: not the op's form

        def forward(self, x):
            return self.norm(x)

    with torch.no_grad():
        torch.compile(M(), backend="lyra")(torch.randn(2, 4, 8))
    left = lyradynamo.compiled_graphs()[0].summary["left"]
    assert left and left[0]["kind"] == "layer_norm" and "last dim" in left[0]["reason"]
    assert "anchor ops left unrewritten" in dump.format_summary(lyradynamo.compiled_graphs()[0].summary)


def test_recompile_is_explained_in_log_and_dump():
    def f(x):
        if x.shape[-1] > 8:  # the model's own Python branches on a size
            return x * 2
        return x + 1

    c = torch.compile(f, backend="lyra")
    c(torch.randn(2, 4))
    c(torch.randn(2, 16))
    recs = lyradynamo.compiled_graphs()
    assert len(recs) == 2 and recs[0].recompile_reason is None
    assert recs[1].recompile_reason and "RECOMPILED because" in dump.format_summary(recs[1].summary)


def test_kernel_paths_on_cuda_name_the_group_norm_path(monkeypatch):
    """The dump says which group norm kernel a CUDA graph runs (config.group_norm_rows)."""
    import lyradynamo.ops as ops

    gm = torch.fx.symbolic_trace(lambda x: torch.ops.lyra.group_norm.default(x, 2, None, None, 1e-5, "silu", True))
    monkeypatch.setattr(ops, "csrc_status", lambda: "built")
    assert "prefer_rows" in dump.kernel_paths(gm, "cuda")["group_norm"]  # default: auto
    with lyradynamo.config.patch(group_norm_rows=False):
        assert "group_norm_rows.cu" not in dump.kernel_paths(gm, "cuda")["group_norm"]
    with lyradynamo.config.patch(group_norm_rows=True):
        assert "group_norm_rows.cu" in dump.kernel_paths(gm, "cuda")["group_norm"]
