"""The dashboard API (FastAPI): worklist, study results, audit trail. Imports ``triage_core`` only."""
