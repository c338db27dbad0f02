"""``soda audit``: scan a folder or manifest of model files for semantic backdoors.

Every file is loaded safely, detected with the same code as ``soda detect`` and written as one
row, on a local process pool or on a Ray cluster (docs/audit.md).
"""

from .report import audit_row, rows_csv, rows_html, sort_rows
from .run import AUDIT_LOG, AuditConfig, AuditReport, plan_tasks, run_audit
from .scan import ModelFile, file_sha256, find_models, read_model_manifest
from .worker import AuditSettings, AuditTask, audit_model

__all__ = ["AUDIT_LOG", "AuditConfig", "AuditReport", "AuditSettings", "AuditTask", "ModelFile", "audit_model",
           "audit_row", "file_sha256", "find_models", "plan_tasks", "read_model_manifest", "rows_csv", "rows_html",
           "run_audit", "sort_rows"]
