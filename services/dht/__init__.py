"""The dmoe DHT node: Kademlia over gRPC (``python -m services.dht``) and its client.

Never import torch here: the DHT node runs in small containers without it.
"""
