"""Representative specs for the Job manifests (shared by the golden generator and the test)."""
from typing import Any

UID = "0f0e0d0c-1111-2222-3333-444455556666"
BASE: dict[str, Any] = {
    "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}},
    "table": "public.customers",
    "set": {"status": "'inactive'"},
    "where": "status IS NULL",
}
CASES: dict[str, dict[str, Any]] = {
    "defaults": {"spec": {}, "name": "customers-inactive", "shard": 0, "run": 1},
    "every-worker-field": {
        "spec": {"worker": {
            "image": "registry.example/backfill:1.2", "imagePullPolicy": "Always", "serviceAccountName": "shop-backfill",
            "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "2", "memory": "1Gi"}},
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 4242, "capabilities": {"drop": ["ALL"]}},
            "podSecurityContext": {"runAsNonRoot": True, "fsGroup": 2000},
            "backoffLimit": 2, "activeDeadlineSeconds": 3600,
        }},
        "name": "b", "shard": 3, "run": 7,
    },
    "pod-failure-policy": {"spec": {"parallelism": 4}, "name": "bf", "shard": 2, "run": 3, "pod_failure_policy": True},
    "long-name-no-service-account": {
        "spec": {"worker": {"resources": {}}}, "name": "a-very-long-backfill-name-that-needs-to-be-truncated-" + "x" * 20,
        "shard": 11, "run": 120, "no_service_account": True,
    },
}
