"""Packaging: every subpackage is listed in pyproject.toml, and the Triton kernels install as pikv_kernels."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pikv_train").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    assert "pikv_kernels" in listed and "kernels" not in listed


def test_kernels_import_under_our_own_name():
    import pikv_kernels

    assert hasattr(pikv_kernels, "fused_router")
    # Editable installs point at the repository's pikv_kernels/ folder, regular ones at site-packages.
    from pathlib import Path

    assert Path(pikv_kernels.__file__).parent.name in ("kernels", "pikv_kernels")
