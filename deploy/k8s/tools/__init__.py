"""Checks of the Kubernetes manifests that run without a cluster (tests/test_k8s_*.py, CI).

``render`` builds an overlay with the pinned ``kubectl kustomize``; ``schema`` validates every
object against Kubernetes' own JSON schemas (and the CRDs' committed ones); ``pods`` turns
workloads into the pods a cluster would run (names, DNS names, environment as the kubelet
resolves it); ``checks`` finds what only a running cluster would otherwise reveal.

    python -m deploy.k8s.tools.check deploy/k8s/overlays/gpu --gpu
"""
