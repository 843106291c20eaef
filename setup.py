"""Package layout only; all metadata lives in pyproject.toml.

Packages are discovered, not listed: every package under ``vlcompress/``, plus the top-level
folders ``callbacks/`` and ``datamodules/`` installed as ``vlcompress.callbacks`` and
``vlcompress.datamodules`` (never as bare ``callbacks`` / ``datamodules``), with their
subpackages. The YAML experiments under ``experiments/`` ship as ``vlcompress/experiments/``.
"""

from setuptools import find_packages, setup

MAPPED = {"vlcompress.callbacks": "callbacks", "vlcompress.datamodules": "datamodules"}
EXPERIMENTS = {"vlcompress.experiments": "experiments"}


def discover() -> tuple[list[str], dict[str, str]]:
    """Packages and the package-dir mapping (subpackages follow their parent's folder)."""
    packages = find_packages(include=["vlcompress", "vlcompress.*"])
    package_dir = {"vlcompress": "vlcompress"}
    for name, folder in MAPPED.items():
        package_dir[name] = folder
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    package_dir.update(EXPERIMENTS)
    packages += list(EXPERIMENTS)  # a data-only package: no __init__.py, YAML files only
    return sorted(set(packages)), package_dir


packages, package_dir = discover()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"vlcompress.experiments": ["*.yaml", "**/*.yaml"]},
    include_package_data=False,
)
