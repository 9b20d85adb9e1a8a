"""The FastAPI application: the REST API and the dashboard, served together.

`farm api` serves it with uvicorn (`uvicorn api.app:create_app --factory`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api import errors
from api.chartcache import ChartCache
from api.limits import BodyLimitMiddleware
from api.routes import candidates, dashboard, experiments, health, programs, reports, workers
from farm.settings import Settings, get_settings

HERE = Path(__file__).resolve().parent

DESCRIPTION = """
researchfarm's REST API. Submit research programs, watch their experiments, inject your own
candidate patches, export results.

**Auth**: `Authorization: Bearer <token>` (create one with `farm token create NAME`). Every write
needs a token; reads need one unless the deployment sets `FARM_PUBLIC_DASHBOARD=true`.
Errors are `{"detail": "<one line>"}`; a 422 names the field.
"""

TAGS = [
    {"name": "programs", "description": "Research programs and their lifecycle"},
    {"name": "experiments", "description": "Runs of candidates, baselines and confirmations"},
    {"name": "reports", "description": "results.tsv and progress plots"},
    {"name": "workers", "description": "Training workers, one per GPU"},
    {"name": "operations", "description": "Health and metrics"},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, and nothing here may fetch
    # from the internet at run time; the spec itself is at /openapi.json
    app = FastAPI(title="researchfarm", version="0.1.0", description=DESCRIPTION, openapi_tags=TAGS,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.chart_cache = ChartCache()
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    errors.install(app)
    for module in (programs, experiments, candidates, reports, workers, health, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
