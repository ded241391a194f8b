"""Hypothesis profiles: random examples when run by hand, a fixed set in CI.

Locally every run draws new examples, so the property tests keep hunting for bugs (that is
how the quantizer's rounding at the clip was found). CI (``CI`` set, as ``.ci/run`` is
started) replays one derandomized set, so a landing is never decided by a lucky draw.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
