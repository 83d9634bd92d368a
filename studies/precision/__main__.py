"""``python -m studies.precision [run|report] ...``: see :mod:`studies.precision.study`."""

import sys

from studies.precision.study import main

if __name__ == "__main__":
    sys.exit(main())
