"""``python -m studies.scale [run|report]``: see :mod:`studies.scale.study`."""

from studies.scale.study import main

if __name__ == "__main__":
    raise SystemExit(main())
