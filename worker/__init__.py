"""Celery GPU workers: claim, run in a sandbox, report."""
