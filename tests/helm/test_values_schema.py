"""Bad values stop `helm install` before anything reaches the cluster: values.schema.json rejects
wrong types, unknown keys and out-of-range numbers, and the templates refuse the combinations a
schema cannot express, each with a message naming the value to change."""

from __future__ import annotations

import pytest

SCHEMA_VIOLATIONS = {
    "unknown store type": ({"adapterStore": {"type": "ftp"}}, "/adapterStore/type"),
    "negative replicas": ({"engine": {"replicas": -1}}, "/engine/replicas"),
    "no routers": ({"router": {"replicas": 0}}, "/router/replicas"),
    "unknown top-level key": ({"replicaCount": 3}, "'replicaCount' not allowed"),
    "negative rate limit": ({"rateLimits": {"tokensPerMinute": -5}}, "/rateLimits/tokensPerMinute"),
    "a tenant's unknown limit": ({"rateLimits": {"tenants": {"a": {"tpm": 5}}}}, "'tpm' not allowed"),
    "traces endpoint without scheme": ({"tracing": {"otlpEndpoint": "otel-collector:4318"}}, "/tracing/otlpEndpoint"),
    "gRPC traces endpoint with a path": ({"tracing": {"otlpEndpoint": "grpc://otel-collector:4317/v1/traces"}},
                                         "/tracing/otlpEndpoint"),
    "redis url without scheme": ({"rateLimits": {"redis": {"url": "redis-master:6379"}}}, "/rateLimits/redis/url"),
    "redis url and its secret both": ({"rateLimits": {"redis": {"url": "redis://r:6379", "existingSecret": "r"}}},
                                      "/rateLimits/redis"),
    "unknown engine key": ({"engine": {"gpus": 1}}, "'gpus' not allowed"),
    "a volume mount without its path": ({"engine": {"extraVolumeMounts": [{"name": "adapters"}]}}, "'mountPath'"),
    "audit log as a path": ({"auditLog": "/var/log/audit.jsonl"}, "/auditLog"),
    "shared tenant with a slash": ({"sharedAdaptersTenant": "public/x"}, "/sharedAdaptersTenant"),
    "a tenant's priority as a word": ({"tenantPriorities": {"gold": "high"}}, "/tenantPriorities/gold"),
    "unknown reasoning parser": ({"model": {"reasoningParser": "deepseek"}}, "/model/reasoningParser"),
    "prefix routing as a string": ({"router": {"prefixRouting": "yes"}}, "/router/prefixRouting"),
    "unknown s3 key": ({"adapterStore": {"type": "s3", "s3": {"bucket": "b-1", "bucketName": "x"}}}, "'bucketName'"),
    "s3 without bucket": ({"adapterStore": {"type": "s3"}}, "/adapterStore/s3/bucket"),
    "invalid bucket name": ({"adapterStore": {"type": "s3", "s3": {"bucket": "Not_A_Bucket"}}}, "/adapterStore/s3/bucket"),
    "half the s3 credentials": ({"adapterStore": {"type": "s3", "s3": {"bucket": "b-1", "accessKeyId": "AKIA"}}},
                                "/adapterStore/s3"),
    "endpoint without scheme": ({"adapterStore": {"type": "s3", "s3": {"bucket": "b-1", "endpointUrl": "minio:9000"}}},
                                "/adapterStore/s3/endpointUrl"),
    "unknown pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "unknown dtype": ({"model": {"dtype": "int8"}}, "/model/dtype"),
    "unparsable kv cache size": ({"model": {"kvCacheMemory": "lots"}}, "/model/kvCacheMemory"),
    "kv cache share without a number": ({"model": {"kvCacheMemory": "most%"}}, "/model/kvCacheMemory"),
    "replicas as a string": ({"engine": {"replicas": "2"}}, "/engine/replicas"),
    "threads below one": ({"engine": {"numThreads": 0}}, "/engine/numThreads"),
    "api key with a space": ({"auth": {"apiKeys": [{"key": "sk team a 123", "tenant": "a"}]}}, "/auth/apiKeys/0/key"),
    "api key with a comment sign": ({"auth": {"apiKeys": [{"key": "sk#123456789", "tenant": "a"}]}}, "/auth/apiKeys/0/key"),
    "invalid tenant": ({"auth": {"apiKeys": [{"key": "sk-0123456789", "tenant": "../a"}]}}, "/auth/apiKeys/0/tenant"),
    "api key without tenant": ({"auth": {"apiKeys": [{"key": "sk-0123456789"}]}}, "tenant"),
    "setting not a LORAGATE_ variable": ({"engine": {"config": {"HOME": "/"}}}, "invalid propertyName 'HOME'"),
    "utilization above 100": ({"router": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
                              "/router/autoscaling/targetCPUUtilizationPercentage"),
    "bad disruption budget": ({"engine": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
                              "/engine/podDisruptionBudget/maxUnavailable"),
    "unknown access mode": ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "/persistence/accessModes/0"),
    "unknown service type": ({"router": {"service": {"type": "ExternalName"}}}, "/router/service/type"),
    "negative preStop sleep": ({"router": {"preStopSleepSeconds": -1}}, "/router/preStopSleepSeconds"),
    "scrape interval without unit": ({"metrics": {"serviceMonitor": {"interval": "30"}}},
                                     "/metrics/serviceMonitor/interval"),
}

TEMPLATE_REFUSALS = {
    "two engines on a ReadWriteOnce volume": ({"engine": {"replicas": 2}}, "ReadWriteMany"),
    "autoscaled engines on a ReadWriteOnce volume": (
        {"engine": {"autoscaling": {"enabled": True, "maxReplicas": 3}}}, "up to 3 engines"),
    "local store without a volume": ({"persistence": {"enabled": False}}, "persistence.enabled=true"),
    "autoscaling min above max": (
        {"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "router.autoscaling.minReplicas (5) is above maxReplicas (2)"),
    "existing auth secret with no key named": (
        {"auth": {"existingSecret": "keys", "existingSecretKeys": {"apiKeys": "", "adminKey": ""}}}, "auth.enabled=false"),
    "preStop sleep using up the grace period": (
        {"engine": {"preStopSleepSeconds": 60}}, "engine.preStopSleepSeconds (60) must be below terminationGracePeriodSeconds (60)"),
    "existing s3 secret missing a key name": (
        {"adapterStore": {"type": "s3", "s3": {"bucket": "b-1", "existingSecret": "aws",
                                               "existingSecretKeys": {"accessKeyId": "id", "secretAccessKey": ""}}}},
        "existingSecretKeys must name both"),
}

ACCEPTED = {
    "two engines on a ReadWriteMany volume": {"engine": {"replicas": 2}, "persistence": {"accessModes": ["ReadWriteMany"]}},
    "two engines on an existing claim": {"engine": {"replicas": 2}, "persistence": {"existingClaim": "nfs-claim"}},
    "many engines on s3 with per-pod caches": {"engine": {"replicas": 8}, "persistence": {"enabled": False},
                                                "adapterStore": {"type": "s3", "s3": {"bucket": "b-1"}}},
    "percent disruption budget": {"engine": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"}}},
    "numeric settings": {"engine": {"config": {"LORAGATE_MAX_MODEL_LEN": 4096}}},
    "no preStop sleep": {"router": {"preStopSleepSeconds": 0}},
    "kv cache as a share of free memory": {"model": {"kvCacheMemory": "80%"}},
}


@pytest.mark.parametrize("case", list(SCHEMA_VIOLATIONS))
def test_schema_rejects(helm, chart, render, case):
    values, where = SCHEMA_VIOLATIONS[case]
    with pytest.raises(helm.HelmValuesError, match="schema") as raised:
        render(values)  # what `helm install` / `helm template` do
    assert where in str(raised.value)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


@pytest.mark.parametrize("case", list(TEMPLATE_REFUSALS))
def test_templates_refuse(helm, chart, render, case):
    values, message = TEMPLATE_REFUSALS[case]
    chart.validate_schema(values)  # valid taken one key at a time ...
    with pytest.raises(helm.HelmRenderError) as raised:  # ... but not together
        render(values)
    assert message in str(raised.value)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted(chart, render, case):
    chart.validate_schema(ACCEPTED[case])
    assert render(ACCEPTED[case]).workload("engine")
