"""The GPU check (``python -m studies.gpu_check``, or ``bash scripts/gpu_check.sh`` on a CUDA machine): seconds per
Lightning step, peak CUDA memory and the GPU's hypergradient against the CPU's. The check is
:mod:`studies.gpu_check.check`; it prints its tables and writes them to ``gpu_check.json`` and ``gpu_check.md``.
"""
