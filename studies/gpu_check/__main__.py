"""``python -m studies.gpu_check [--device cuda|cpu] [--steps ...]``: see studies.gpu_check.check."""

from studies.gpu_check.check import main

if __name__ == "__main__":
    main()
