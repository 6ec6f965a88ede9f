"""Packaging of himbeere; ``pip install -e '.[test,dev]'`` for development."""

from __future__ import annotations

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version() -> str:
    """``__version__`` of himbeere/__init__.py, read without importing it.

    Importing would need the dependencies installed before they are.
    """
    init = HERE / "himbeere" / "__init__.py"
    match = re.search(
        r"""^__version__\s*=\s*["']([^"']+)["']""", init.read_text(encoding="utf-8"), re.M
    )
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line in {init}")
    return match.group(1)


def read_readme() -> str:
    """README.rst, PyPI's description of the package (``twine check`` in CI)."""
    return (HERE / "README.rst").read_text(encoding="utf-8")


setup(
    name="himbeerecouch",
    version=read_version(),
    description="Run Python code stored in CouchDB on Raspberry Pis",
    long_description=read_readme(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.9",
    packages=find_packages(include=["himbeere", "himbeere.*", "himbeerecouch", "uploader",
                                    "uploader.*"]),
    # himbeere.service: the systemd unit `rspby install` installs from the package.
    package_data={"uploader.dashboard": ["templates/*.html", "static/*",
                                         "static/vendor/uplot/*"],
                  "himbeere.couch.js": ["*.js"], "himbeere": ["himbeere.service"]},
    install_requires=["couchdb", "requests", "netifaces-plus; platform_system != 'Linux'",
                      "python-daemon", "cryptography"],
    extras_require={
        "gpio": ["RPi.GPIO"],
        # The web dashboard (`himbeere dashboard`) and its /metrics for Prometheus;
        # a laptop's, never a Pi's.
        "dashboard": ["flask>=2.2", "prometheus_client>=0.16"],
        # selenium drives Debian's chromium/chromedriver in the dashboard's browser tests;
        # pytest-xdist runs the suite on several cores (.ci/run: -n 2).
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "flask>=2.2",
                 "prometheus_client>=0.16", "selenium>=4.11", "aiohttp>=3.8"],
        # benchmarks/simulate.py plays thousands of nodes in one process with
        # aiohttp's asyncio client; bench_scale.py draws its charts with matplotlib.
        "bench": ["aiohttp>=3.8", "matplotlib>=3.5"],
        # build and twine: CI builds the sdist and wheel and checks their description.
        "dev": ["ruff", "mypy", "types-requests", "docutils", "build", "twine"],
        # The documentation (docs/, sphinx-build -W); 7.2 still runs on Python 3.9.
        "docs": ["sphinx>=7.2,<10"],
    },
    entry_points={
        "console_scripts": [
            "himbeere=uploader.main:main",
            "himbeere-upload=uploader.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
