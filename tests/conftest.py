"""Hypothesis profiles: one fixed set of examples by default, fresh ones on request.

By default (``make test``, CI, a plain ``pytest``) every property test replays one
derandomized set of examples and keeps no example database, so a rare example found once
can never turn every later run red. ``make test-fuzz`` (``SHOAL_HYPOTHESIS=fuzz``) draws
fresh examples, more of them, and prints how to reproduce a failure: that is how the
quantizer's rounding at the clip and the geometric median's slow convergence were found.
An example it finds becomes an explicit test (``@example`` or a plain test), never a file
in ``.hypothesis/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings

import shoal

# pytest put this checkout's src first on sys.path (pyproject: pythonpath); child processes
# (`python -m shoal.cli.main ...` in the integration tests) must run the same code.
_SRC = str(Path(shoal.__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)

settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=300, database=None, print_blob=True)
settings.load_profile("fuzz" if os.environ.get("SHOAL_HYPOTHESIS") == "fuzz" else "fixed")
