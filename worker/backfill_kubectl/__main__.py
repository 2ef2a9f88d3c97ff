"""``python -m backfill_kubectl``: what the krew shim runs (plugins/krew/kubectl-backfill)."""

from backfill_kubectl.app import main

main()
