"""``python -m studies.lightning_step [--dataset ...] [--estimators ...]``: see studies.lightning_step.step_time."""

from studies.lightning_step.step_time import main

if __name__ == "__main__":
    main()
