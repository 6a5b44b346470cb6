"""``python bench/queue.py [--quick]``: the lab queue's benchmark, which lives in ``bench/lab_queue.py``.

Every script in bench/ has this folder first on ``sys.path``, so an ``import queue`` anywhere in it
(concurrent.futures, logging.handlers, ...) finds this file. Imported under that name, it puts the standard
library's ``queue`` in its own place; run as a script, it runs the benchmark.
"""

if __name__ == "__main__":
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().with_name("lab_queue.py")), run_name="__main__")
else:
    import importlib.util
    import os
    import sys
    import sysconfig

    _spec = importlib.util.spec_from_file_location(__name__, os.path.join(sysconfig.get_paths()["stdlib"], "queue.py"))
    _stdlib = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _stdlib
    _spec.loader.exec_module(_stdlib)
