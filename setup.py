"""Build script: the pure-Python package plus the optional C++ extension ``spo_fast._C``.

``kernels/`` is installed as the sub-package ``spo_fast.kernels`` (a top-level ``kernels`` module would clash
with Hugging Face's ``kernels`` package on PyPI).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["spo_fast", "spo_fast.*"])
package_dir = {"": "."}
if __import__("os").path.isdir("kernels"):
    packages.append("spo_fast.kernels")
    package_dir["spo_fast.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir)
