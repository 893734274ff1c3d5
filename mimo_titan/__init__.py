"""mimo_titan: multimodal MIMO training with per-module DeviceMeshes."""

import importlib.util as _util
from pathlib import Path as _Path


def _check_kernels_package() -> None:
    """Fail with the cause and the fix when another top-level ``kernels`` package (Hugging Face's ``kernels``, which
    transformers >= 5.25 requires) shadows this repository's Triton kernels."""
    spec = _util.find_spec("kernels")
    origin = _Path(spec.origin).resolve() if spec is not None and spec.origin else None
    ours = _Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    if origin is not None and origin != ours and not (origin.parent / "permute.py").exists():
        raise ImportError(
            f"the module 'kernels' resolves to {origin}, not mimo_titan's Triton kernels ({ours}): another package "
            "named 'kernels' is installed (Hugging Face's, pulled in by transformers >= 5.25); run "
            "`pip uninstall kernels` and `pip install 'transformers<5.25'`, or reinstall with `pip install -e .`"
        )


_check_kernels_package()
