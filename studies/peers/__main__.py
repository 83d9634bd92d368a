"""``python -m studies.peers``: see :mod:`studies.peers.study`. Ctrl-C while it starts (torch loading) ends it with
one line."""

import os
import signal
import sys


def _leave_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} while starting: nothing was run\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    previous = {s: signal.signal(s, _leave_while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    from studies.peers.study import main

    for stop, handler in previous.items():
        signal.signal(stop, handler)
    raise SystemExit(main())
