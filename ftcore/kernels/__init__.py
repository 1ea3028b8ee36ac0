"""ftcore.kernels: the kernel registry and the fused Triton kernels (the repository's kernels/).

The code lives in the top-level kernels/ folder, which has no __init__.py on purpose: with the
checkout's root on sys.path (`python -m pytest`, `python -c`, a script in the root), a plain
`import kernels` must reach the PyPI package `kernels` that transformers imports, not this
project's folder. This file is the package's front door: an installed wheel has the kernel
modules beside it (setup.py puts them here); a checkout or an editable install adds the folder
to `__path__`, the documented way for a package to span directories. See docs/design.md.
"""
from pathlib import Path as _Path

if not (_Path(__file__).parent / "registry.py").exists():
    __path__.append(str(_Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821

from .registry import (LAYER_KINDS, LossFn, available_kernels, available_losses,  # noqa: E402
                       get_kernel, get_loss, linear_cross_entropy, register_kernel,
                       register_loss, require_triton_device, torch_linear_cross_entropy)

__all__ = ["LAYER_KINDS", "LossFn", "available_kernels", "available_losses", "get_kernel",
           "get_loss", "linear_cross_entropy", "register_kernel", "register_loss",
           "require_triton_device", "torch_linear_cross_entropy"]
