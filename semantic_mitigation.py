#!/usr/bin/env python
"""The SODA study's analysis and repair command line; the front end is :mod:`soda_backdoor.compat.mitigation`.

Example: ``python semantic_mitigation.py --option=detect --in_model=m.th --data_name=FMNIST``
(see docs/study_compat.md).
"""

import sys

from soda_backdoor.compat.mitigation import main

if __name__ == "__main__":
    sys.exit(main())
