"""``python -m studies.quality [--quick] [--tasks N] [--out DIR] ...``: see :mod:`studies.quality.quality`."""

from studies.quality.quality import main

if __name__ == "__main__":
    main()
