"""The peers study: the project's hypergradients against learn2learn, higher and TorchOpt (see ``study.py``)."""
