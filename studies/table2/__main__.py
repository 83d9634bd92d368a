"""``python -m studies.table2 {run,report} ...``: see :mod:`studies.table2.runner`."""

import sys

from studies.table2.runner import main

if __name__ == "__main__":  # worker processes (--workers) import this module again under another name
    sys.exit(main())
