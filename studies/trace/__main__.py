"""``python -m studies.trace {run,init} ...``: see :mod:`studies.trace.trace`."""

import sys

from studies.trace.trace import main

if __name__ == "__main__":
    sys.exit(main())
