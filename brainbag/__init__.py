"""brainbag: brain age and sex from T1-weighted MRI with 3D BagNets."""

from __future__ import annotations

__version__ = "0.1.0"

from brainbag.errors import BrainbagError  # noqa: E402

__all__ = ["BrainbagError", "__version__"]
