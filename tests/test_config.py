import pytest

import lyradynamo
from lyradynamo import config


def test_defaults_and_describe():
    assert config.quant == "none"
    assert config.cuda_graphs is True
    assert set(config.passes) == {"layout", "conv1x1", "linear", "attention", "group_norm", "conv_bias", "adaln", "rope", "split_cat",
                                   "shared_input"}
    text = config.describe()
    for name in ("passes", "quant", "cuda_graphs", "attention_backend", "dump_dir"):
        assert name in text


def test_module_level_set_and_patch_block():
    config.cuda_graphs = False
    try:
        assert lyradynamo.config.cuda_graphs is False
    finally:
        config.cuda_graphs = True
    with config.patch(quant="fp8", attention_backend="cudnn"):
        assert config.quant == "fp8" and config.attention_backend == "cudnn"
    assert config.quant == "none" and config.attention_backend == "auto"


@pytest.mark.parametrize("name,value,needle", [
    ("quant", "fp4", "allowed values: 'none', 'fp8', 'int8'"),
    ("attention_backend", "xformers", "attention_backend"),
    ("cuda_graphs", "yes", "expected bool"),
    ("gated_gemm", "triton", "allowed values: 'auto', 'cutlass', 'cublaslt'"),
    ("short_kv_attention", "on", "allowed values: 'auto', 'off'"),
    ("passes", ("linear", "conv"), "unknown pass"),
    ("no_such_option", 1, "has no option"),
])
def test_bad_values_name_option_and_allowed(name, value, needle):
    with pytest.raises(config.LyraConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        setattr(config, name, value)


def test_patch_validates_before_setting_anything():
    with pytest.raises(config.LyraConfigError):
        with config.patch(cuda_graphs=False, quant="bogus"):
            pass
    assert config.cuda_graphs is True


def test_parse_reads_command_line_options():
    every = tuple(config.passes)
    got = config.parse(["new_shape_warmup=false", "gemm_autotune=4", "passes=-shared_input", "quant=fp8"])
    assert got == {"new_shape_warmup": False, "gemm_autotune": 4,
                   "passes": tuple(p for p in every if p != "shared_input"), "quant": "fp8"}
    assert config.parse(["passes=linear,attention"]) == {"passes": ("linear", "attention")}
    for bad in ("new_shape_warmup", "no_such_option=1"):
        with pytest.raises(config.LyraConfigError, match="expected KEY=VALUE"):
            config.parse([bad])
    with pytest.raises(ValueError):
        config.parse(["gemm_autotune=many"])
