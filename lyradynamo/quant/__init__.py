"""FP8 / INT8 quantisation for lyra::linear (config.quant = "fp8" | "int8").

numerics.py     the reference math (per-row scales, rounding, saturation, SmoothQuant) that
                the CUDA kernels are tested against and the CPU path runs;
weights.py      quantised weight copies, refreshed when a weight changes in place;
apply.py        the graph rewrite lyra::linear -> lyra::qlinear, with per-layer decisions;
calibration.py  optional SmoothQuant factors for INT8.
"""
from .calibration import calibrate  # noqa: F401
from .weights import master_weight, restore  # noqa: F401
