"""``python -m studies.peers``: see :mod:`studies.peers.study`."""

from studies.peers.study import main

if __name__ == "__main__":
    raise SystemExit(main())
