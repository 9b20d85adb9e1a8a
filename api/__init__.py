"""REST API and dashboard (FastAPI)."""
