"""Long horizons: do the estimators, Greedy among them, escape short-horizon bias?

``python -m studies.horizon nqm``: part 1, the noisy quadratic model of Wu et al. (2018), where the optimal SGD
schedule and every schedule's expected final loss are known in closed form (:mod:`.nqm`, :mod:`.nqm_study`).
"""
