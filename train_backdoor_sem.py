#!/usr/bin/env python
"""The SODA study's training command line; the front end is :mod:`soda_backdoor.compat.train`.

Example: ``python train_backdoor_sem.py --option=semtrain --t_attack=stripet --data_name=FMNIST``
(see docs/study_compat.md).
"""

import sys

from soda_backdoor.compat.train import main

if __name__ == "__main__":
    sys.exit(main())
