"""``kubectl backfill``: the kubectl plugin (console script ``kubectl-backfill``).

* ``app``      — the typer commands (list, status, pause, resume, retry, wait, logs, plan, report, version)
* ``kube``     — the kubeconfig as kubectl reads it, and every API call, each error mapped to an exit code
* ``view``     — what to show and decide: tables, throttle explanations, exit codes, merged logs (PURE)
* ``plan_pod`` — the short-lived pod running ``backfill plan`` in the cluster (PURE)
* ``report``   — the redacted bug-report archive (PURE layout and redaction)

Layering: the contract (``backfill_api``), the operator's pure Job rendering and labels
(``backfill_operator.jobs``, so the plan pod is the worker pod) and the engine's redaction
(``backfill_worker.sql.secrets``); nothing imports this package.
"""
