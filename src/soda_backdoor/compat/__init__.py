"""Front ends that accept the SODA study's command lines (``train_backdoor_sem.py``,
``semantic_mitigation.py``) and run them through :mod:`soda_backdoor.workflow`."""
