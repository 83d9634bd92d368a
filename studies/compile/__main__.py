"""``python -m studies.compile run|report``: see :mod:`studies.compile.study`."""

import sys

from studies.compile.study import main

if __name__ == "__main__":
    sys.exit(main())
