"""Install lyradynamo; build the CUDA library (csrc/, CMake + pybind11) when nvcc is found.

    pip install -e ".[test]"                          # after torch
    LYRA_CUDA_ARCHS="80;90a" pip install -e .         # other SM targets (default 90a)
    LYRA_NO_CUDA=1 pip install -e .                   # skip the CUDA build
    LYRA_REQUIRE_CUDA=1 pip install -e .              # a failed CUDA build is an error (CI)

Without nvcc the package installs with its PyTorch reference ops only (one notice line).
The CUDA library is torch-free, so the build needs no torch, only nvcc, cmake, pybind11.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class CMakeBuild(build_ext):
    """Runs CMake for the `lyradynamo._C` extension, or skips it with a notice."""

    def run(self) -> None:
        nvcc = _find_nvcc()
        self._skipped = bool(os.environ.get("LYRA_NO_CUDA")) or nvcc is None
        if self._skipped:
            why = "LYRA_NO_CUDA is set" if os.environ.get("LYRA_NO_CUDA") else "nvcc not found"
            print(f"lyradynamo: {why}; installing without the CUDA library (PyTorch reference ops only)")
            return
        ext = self.extensions[0]
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        cfg = [cmake, "-S", ROOT, "-B", build_dir, f"-DLYRA_OUTPUT_DIR={out_dir}",
               f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
               f"-DLYRA_CUDA_ARCHS={os.environ.get('LYRA_CUDA_ARCHS', '90a')}"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        if os.environ.get("LYRA_CUTLASS_DIR"):
            cfg.append(f"-DLYRA_CUTLASS_DIR={os.environ['LYRA_CUTLASS_DIR']}")
        start = time.time()
        try:
            subprocess.check_call(cfg)
            subprocess.check_call([cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)])
        except (subprocess.CalledProcessError, OSError) as exc:
            if os.environ.get("LYRA_REQUIRE_CUDA"):
                raise
            self._skipped = True
            print(f"lyradynamo: the CUDA library did not build ({exc}; see the CMake output above: "
                  "cuBLASLt comes with a full CUDA toolkit or `pip install nvidia-cublas`); "
                  "installing without it (PyTorch reference ops only). Set LYRA_REQUIRE_CUDA=1 to make this an error.")
            return
        print(f"lyradynamo: CUDA library built in {time.time() - start:.0f} s -> {out_dir}")

    def get_outputs(self):  # noqa: ANN201 - setuptools API
        return [] if getattr(self, "_skipped", True) else super().get_outputs()


setup(
    ext_modules=[Extension("lyradynamo._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
