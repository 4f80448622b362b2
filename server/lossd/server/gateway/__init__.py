"""The FastAPI gateway of lossd: JSON evaluation, problem-details errors, /metrics and the dashboard."""

from lossd.server.gateway.app import create_app

__all__ = ["create_app"]
