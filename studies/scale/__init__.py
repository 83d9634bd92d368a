"""How far each exact method scales: peak memory of one hypergradient against T on the horizon study's CNN
(``python -m studies.scale run|report``; see :mod:`studies.scale.study`)."""
