"""The privacy package works without torch, and DP-SGD says how to get it."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import importlib.abc
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTorch())  # "import torch" now fails as if it were not installed
import shoal.privacy
assert shoal.privacy.epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=2, delta=1e-5) > 0
try:
    import shoal.privacy.dpsgd
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("dpsgd imported without torch")
"""


def test_privacy_imports_without_torch_and_dpsgd_names_the_extra() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'shoal[torch]'" in proc.stdout
