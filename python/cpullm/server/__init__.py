"""An OpenAI-compatible HTTP server for one model: ``cpullm serve`` (docs/server.md).

Its dependencies (Starlette and uvicorn) are an optional extra, ``pip install 'cpullm[server]'``;
``create_app`` and ``serve`` import them when called, and ``require_server_dependencies`` says clearly
what is missing."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import CpullmError

__all__ = ["INSTALL_HINT", "create_app", "require_server_dependencies", "serve"]

INSTALL_HINT = "pip install 'cpullm[server]'"
_DEPENDENCIES = ("starlette", "uvicorn", "anyio")


def require_server_dependencies() -> None:
    """Raises CpullmError naming the extra to install when Starlette or uvicorn is missing."""
    for name in _DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CpullmError(f"the server needs the optional package {name!r}: {INSTALL_HINT}") from None


def create_app(model: Any, **options: Any) -> Any:
    """The Starlette application serving ``model``; see ``cpullm.server.app.create_app``."""
    require_server_dependencies()
    from .app import create_app as _create_app

    return _create_app(model, **options)


def serve(model: Any, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **options: Any) -> None:
    """Serves ``model`` until interrupted (uvicorn; Ctrl-C stops it)."""
    require_server_dependencies()
    import uvicorn

    app = create_app(model, model_name=model_name, **options)
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # End the running streams now (each gets an error event, then its connection closes), rather
            # than have uvicorn wait for them and then cancel them.
            engine.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    Server(config).run()
