import sys

from studies.imaml.study import main

sys.exit(main())
