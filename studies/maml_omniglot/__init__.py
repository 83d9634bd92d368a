"""learn2learn's published MAML row reproduced with ``lh.MAML``: ``maml_omniglot.py``'s fully connected network,
5-way 1-shot Omniglot, 60,000 iterations (88.9% in learn2learn's table, 89.7% in Finn et al., 2017).

``python -m studies.maml_omniglot run``: the resumable training run (:mod:`.runner`); ``timing``: its seconds per
iteration beside learn2learn's own loop on the same tasks (:mod:`.timing`); ``report``: the results page from the
records (:mod:`.report`). The setting, the data and the network are in :mod:`.experiment`.
"""
