"""Make ``torchvision`` importable when its compiled operators do not match the torch build.

A CUDA build of torchvision installed beside a CPU build of torch (what a plain
``pip install torchvision`` gives after ``torch==X+cpu``) fails on import: its
``_meta_registrations`` module registers fake kernels for ``torchvision::nms`` and friends,
which do not exist because ``torchvision/_C.so`` cannot load. wsi-ssl needs none of those
operators (only the pure-Python transforms, and timm and lightly which import torchvision),
so on that exact failure the module is replaced by an empty one and the import retried.

Importing this module performs the check once; every module of :mod:`wsi_ssl.ssl` that needs
torchvision, timm or lightly imports it first. Nothing is changed when torchvision imports
cleanly.
"""

from __future__ import annotations

import sys
import types
import warnings

__all__ = ["TORCHVISION_OPS_AVAILABLE"]


def _import_torchvision() -> bool:
    """Import torchvision; return whether its compiled operators are usable."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return "torchvision._meta_registrations" not in _STUBBED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision
        return True
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    _STUBBED.add("torchvision._meta_registrations")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchvision  # noqa: F401
    return False


_STUBBED: set[str] = set()
TORCHVISION_OPS_AVAILABLE: bool = _import_torchvision()
