"""``compile_losses`` against eager and against the peers: seconds per outer step of first-order MAML and ANIL on the
canonical Omniglot protocol (5-way 1-shot, meta-batch 32, conv 4 x 64), one CPU thread.

``python -m studies.compile run``: the measurement (:mod:`.study`); ``report``: ``compile.md`` from the record
(:mod:`.report`).
"""
