"""The original ``himbeerecouch.prog`` module: ``run_daemon`` for init scripts."""

from himbeerecouch import run_daemon

__all__ = ["run_daemon"]
