"""``python -m studies.table2 {run,report} ...``: see :mod:`studies.table2.runner`. A stop signal while the package
loads (torch and Lightning) ends it with one line (:data:`studies.table2.STARTING`)."""

import signal
import sys

if __name__ == "__main__":  # worker processes (--workers) import this module again under another name
    from studies.table2 import STARTING
    from studies.table2.runner import main

    for stop, handler in STARTING.items():
        signal.signal(stop, handler)
    sys.exit(main())
