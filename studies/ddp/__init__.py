"""Two-process DDP on CPU: step-time scaling and the wait of a small all-reduce (``python -m studies.ddp``).

:mod:`studies.ddp.scaling` times ``examples/ddp_fewshot.py`` on 1 and 2 processes; :mod:`studies.ddp.allreduce_wait`
times a gloo all-reduce waited on or polled. Published records: ``studies/ddp/results/``.
"""
