"""dmoe: decentralized mixture-of-experts training as gRPC microservices."""

import os

__version__ = "0.1.0"

# gRPC core writes a line to stderr for every refused TLS handshake (INFO level): unbounded
# logs for anyone who can open a TCP connection to a TLS port. Only its errors, unless the
# operator asks for more (GRPC_VERBOSITY=INFO/DEBUG). Must happen before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
