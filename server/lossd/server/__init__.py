"""lossd.server: the grpc.aio service, the HTTP gateway, Prometheus metrics and the ``lossd`` command.

Importing this package imports nothing else: ``lossd eval`` stays as light as the client.
"""

from importlib.metadata import version as _version

__all__ = ["__version__"]

__version__: str = _version("lossd-server")  # the installed distribution's, as lossd.client.__version__
