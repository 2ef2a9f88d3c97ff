"""Test support for talking to a Kubernetes API over real HTTP (kmock, or a real kube-apiserver)."""
