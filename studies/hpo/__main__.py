"""``python -m studies.hpo [--examples ...] [--seeds ...] [--out DIR] [--report]``: see studies.hpo.comparison."""

from studies.hpo.comparison import main

if __name__ == "__main__":
    main()
