"""lyradynamo: a torch.compile backend that makes diffusers models fast on NVIDIA GPUs.

    pipe.unet = torch.compile(pipe.unet, backend="lyra")
    pipe.transformer = torch.compile(pipe.transformer, backend="lyra")

Options live in `lyradynamo.config`. Importing the package (which the `torch_dynamo_backends`
entry point does for you) registers the backend and the lyra:: ops.
"""
from . import config  # noqa: F401  (first: everything else reads it)
from . import ops  # noqa: F401
from . import backend
from .backend import compile_count, compiled_graphs, lyra_backend, reset_stats  # noqa: F401

__version__ = "0.1.0"

backend.register()
