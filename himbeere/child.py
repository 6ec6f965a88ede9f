"""Old name of :mod:`himbeere.runtime.child`, which it is (the same module object).

Kept because programs and their tools written for earlier versions import
``himbeere.child``; code in this repository imports ``himbeere.runtime.child``.
"""

import sys

from .runtime import child

sys.modules[__name__] = child
