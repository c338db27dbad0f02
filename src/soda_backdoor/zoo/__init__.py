"""Model zoos: populations of clean and backdoored models, and a detector scored on them.

See docs/zoo.md for the protocol.
"""

from .build import BuildReport, build_zoo, read_manifest
from .score import ZooScore, label_rows, score_zoo
from .spec import ZooEntry, ZooSpec, load_zoo_spec, with_twins

__all__ = ["BuildReport", "ZooEntry", "ZooScore", "ZooSpec", "build_zoo", "label_rows", "load_zoo_spec",
           "read_manifest", "score_zoo", "with_twins"]
