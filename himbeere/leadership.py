"""Old name of :mod:`himbeere.runtime.leadership`, which it is (the same module object).

Kept because programs and their tools written for earlier versions import
``himbeere.leadership``; code in this repository imports ``himbeere.runtime.leadership``.
"""

import sys

from .runtime import leadership

sys.modules[__name__] = leadership
