"""The swarm explorer: one web page (and ``/api/swarm``) showing the swarm as the DHT sees it.

A DHT client only, no torch: ``python -m services.explorer --initial-peers HOST:PORT``.
Design and API: docs/explorer.md.
"""
