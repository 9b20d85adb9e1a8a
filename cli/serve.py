"""`farm api`: serve the REST API and the dashboard with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer


def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default FARM_API_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FARM_API_PORT)")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the REST API and the web dashboard."""
    import uvicorn

    from farm.db import check_connection
    from farm.settings import get_settings

    s = get_settings()
    check_connection()
    uvicorn.run("api.app:create_app", factory=True, host=host or s.api_host, port=port or s.api_port,
                workers=workers, log_level="info", access_log=False)
