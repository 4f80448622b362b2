"""lossd.server: the grpc.aio service, the HTTP gateway, Prometheus metrics and the ``lossd`` command.

Importing this package imports nothing else: ``lossd eval`` stays as light as the client.
"""
