"""Old name of :mod:`himbeere.runtime.progstate`, which it is (the same module object).

Kept because programs and their tools written for earlier versions import
``himbeere.progstate``; code in this repository imports ``himbeere.runtime.progstate``.
"""

import sys

from .runtime import progstate

sys.modules[__name__] = progstate
