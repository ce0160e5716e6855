"""dmoe: decentralized mixture-of-experts training as gRPC microservices."""

__version__ = "0.1.0"
