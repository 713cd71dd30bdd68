"""Loaded at start-up by processes the load test starts (this directory is on their
PYTHONPATH): records garbage-collector pauses when LOADTEST_GC_DIR is set. See gcstats.py.

gcstats.py is loaded from next to this directory, not imported by package name, so the probe
also works for a dispatcher started from another checkout (the ab scenario)."""

import importlib.util
import os
from pathlib import Path

if os.environ.get("LOADTEST_GC_DIR"):
    _spec = importlib.util.spec_from_file_location(
        "_loadtest_gcstats", Path(__file__).resolve().parent.parent / "gcstats.py"
    )
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
        _module.install_probe()
