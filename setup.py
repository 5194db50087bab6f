"""Build hook (the metadata is in pyproject.toml): the repository's top-level ``calibrate/`` and
``recipes/`` folders go into the wheel as ``kvarn/_data/calibrate`` and ``kvarn/_data/recipes``,
where ``kvarn.paths.shipped_dir`` finds them once installed. No copy of them is kept in the tree.
"""

from setuptools import find_namespace_packages, setup

SHIPPED = {"kvarn._data.calibrate": "calibrate", "kvarn._data.recipes": "recipes"}

setup(
    # namespace packages too: kvarn/quant has no __init__.py
    packages=find_namespace_packages(include=["kvarn", "kvarn.*"], exclude=["*.__pycache__"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={name: ["*"] for name in SHIPPED},
)
