"""The Helm chart renders, lints and validates against Kubernetes' own schemas for every value
set in VALUE_SETS, and what it renders fits together: probes, non-root pods, the
router's engine DNS name, Secret references, S3 settings, and settings the server knows."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

KUBE_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for
HOME = "/var/lib/loragate"
HPA_VALUES = {"engine": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}},
              "router": {"autoscaling": {"enabled": True}},
              "persistence": {"accessModes": ["ReadWriteMany"], "storageClass": "nfs"}}
MONITORED_VALUES = {"engine": {"podDisruptionBudget": {"enabled": True}, "service": {"enabled": True}},
                    "router": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"}},
                    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}}}
_BASE_KINDS = {"ConfigMap": 2, "Secret": 1, "PersistentVolumeClaim": 1, "StatefulSet": 1, "Deployment": 1,
               "Service": 2, "ServiceAccount": 1}

# name -> (values, the kinds and how many of each the rendering must hold)
VALUE_SETS: dict[str, tuple[dict, dict[str, int]]] = {
    "default": ({}, _BASE_KINDS),
    # Several engines on S3, no shared volume (each engine caches in an emptyDir), static keys.
    "s3": ({"adapterStore": {"type": "s3", "s3": {
                "bucket": "team-adapters", "prefix": "prod/adapters", "endpointUrl": "http://minio.storage:9000",
                "region": "eu-west-1", "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "c2VjcmV0"}},
            "persistence": {"enabled": False}, "engine": {"replicas": 3}},
           {**_BASE_KINDS, "Secret": 2, "PersistentVolumeClaim": 0}),
    # S3 credentials from the pod's identity (IRSA): no S3 Secret at all.
    "s3-pod-identity": ({"adapterStore": {"type": "s3", "s3": {"bucket": "team-adapters"}},
                         "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/lg"}}},
                        _BASE_KINDS),
    "hpa": (HPA_VALUES, {**_BASE_KINDS, "HorizontalPodAutoscaler": 2}),
    # Keys in a Secret the user manages (keys file only), adapters on an existing claim.
    "existing-secret": ({"auth": {"existingSecret": "team-keys",
                                  "existingSecretKeys": {"apiKeys": "keys.txt", "adminKey": ""}},
                         "persistence": {"existingClaim": "shared-adapters"}, "engine": {"replicas": 2}},
                        {**_BASE_KINDS, "Secret": 0, "PersistentVolumeClaim": 0}),
    "existing-s3-secret": ({"adapterStore": {"type": "s3", "s3": {
                               "bucket": "team-adapters", "existingSecret": "aws",
                               "existingSecretKeys": {"accessKeyId": "id", "secretAccessKey": "secret"}}}},
                           _BASE_KINDS),
    "pdb-servicemonitor": (MONITORED_VALUES, {**_BASE_KINDS, "PodDisruptionBudget": 2, "ServiceMonitor": 1, "Service": 3,
                                              "ConfigMap": 3}),
    # Everyone's limits, and two tenants' own in a mounted file.
    "rate-limits": ({"rateLimits": {"requestsPerMinute": 120, "tokensPerMinute": 50000, "tenants": {
                        "team-a": {"requests_per_minute": 600, "tokens_per_minute": 200000},
                        "trial": {"tokens_per_minute": 5000}}}},
                    {**_BASE_KINDS, "ConfigMap": 3}),
    # The routers share their buckets in a Redis: its URL (with a password) from a Secret.
    "rate-limits-redis": ({"rateLimits": {"tokensPerMinute": 50000, "redis": {
                              "existingSecret": "redis-auth", "existingSecretKey": "rate-limit-url"}}}, _BASE_KINDS),
    # Traces from the router and the engines to an OpenTelemetry collector.
    "tracing": ({"tracing": {"otlpEndpoint": "http://otel-collector.observability:4318/v1/traces"}}, _BASE_KINDS),
    "tracing over gRPC": ({"tracing": {"otlpEndpoint": "grpc://otel-collector.observability:4317"}}, _BASE_KINDS),
    # Tenants' scheduling priorities, reasoning split off, prefix routing off.
    "priorities": ({"tenantPriorities": {"gold": -1, "free": 2}, "model": {"reasoningParser": "none"},
                    "router": {"prefixRouting": False}}, _BASE_KINDS),
    # Adapter management in the engines' logs, timings in answers, a tenant shared with all.
    "audit-timings-shared": ({"auditLog": True, "perRequestMetrics": True, "sharedAdaptersTenant": "public"},
                             _BASE_KINDS),
    # Adapters shipped with the deployment: a read-only claim mounted for --lora-modules.
    "preloaded-adapters": ({"engine": {
        "config": {"LORAGATE_LORA_MODULES": "team-a/sql=/adapters/sql"},
        "extraVolumes": [{"name": "adapters", "persistentVolumeClaim": {"claimName": "team-adapters", "readOnly": True}}],
        "extraVolumeMounts": [{"name": "adapters", "mountPath": "/adapters", "readOnly": True}]}}, _BASE_KINDS),
    "open-loadbalancer": ({"auth": {"enabled": False}, "router": {"service": {"type": "LoadBalancer"}},
                           "model": {"servedName": "assistant,gpt-4o-mini"}},
                          {**_BASE_KINDS, "Secret": 0}),
}


def pytest_generate_tests(metafunc):
    if "value_set" in metafunc.fixturenames:
        metafunc.parametrize("value_set", list(VALUE_SETS))


@pytest.fixture
def rendered(render, value_set):
    return render(VALUE_SETS[value_set][0])


def _pod_specs(rendered):
    return [(w["metadata"]["name"], w["spec"]["template"]) for w in rendered.all("StatefulSet") + rendered.all("Deployment")]


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_lint_finds_nothing(helm, chart_dir, value_set):
    report = helm.lint(chart_dir, VALUE_SETS[value_set][0], strict=True, namespace="ml",
                       kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 = warning, 3 = error


def test_manifests_are_valid_kubernetes(rendered, value_set, kube_validate):
    assert Counter(m["kind"] for m in rendered.manifests) == +Counter(VALUE_SETS[value_set][1])
    assert len({(m["kind"], m["metadata"]["name"]) for m in rendered.manifests}) == len(rendered.manifests)
    for manifest in rendered.manifests:
        assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == rendered.release
        if manifest["kind"] == "ServiceMonitor":  # a CRD: no schema shipped; checked by hand below
            continue
        try:
            kube_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kube_validate.ValidationError as e:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {e.message} at {list(e.path)}")


def test_probes_resources_and_non_root(rendered):
    for component in ("engine", "router"):
        container, pod = rendered.container(component), rendered.workload(component)["spec"]["template"]["spec"]
        (port,) = container["ports"]
        assert port["name"] == "http" and str(port["containerPort"]) == rendered.env(component)["LORAGATE_PORT"]
        assert rendered.env(component)["LORAGATE_HOST"] == "0.0.0.0"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, (component, probe)
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
        # Serves on while it leaves the Services, then has time left to finish open requests.
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and 0 < int(sleep[1]) < pod["terminationGracePeriodSeconds"]

        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # A read-only root still needs a writable /tmp and LORAGATE_HOME.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert rendered.env(component)["LORAGATE_HOME"] == HOME and HOME in mounts

    startup = rendered.container("engine")["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading takes minutes
    assert "startupProbe" not in rendered.container("router")
    assert rendered.container("engine")["args"] == ["serve", "--role", "engine"]
    assert rendered.container("router")["args"] == ["serve", "--role", "router"]


def test_router_resolves_the_engines_headless_service(rendered):
    from loragate.gateway.discovery import parse_dns_target

    host, port = parse_dns_target(rendered.env("router")["LORAGATE_ENGINE_DNS"])
    service_name, namespace, svc, domain = host.split(".", 3)
    assert (namespace, svc, domain) == (rendered.namespace, "svc", "cluster.local")
    service = rendered.one("Service", service_name)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False  # the router must only learn ready engines
    assert [p["port"] for p in service["spec"]["ports"]] == [port]

    engines = rendered.workload("engine")
    assert engines["spec"]["serviceName"] == service_name
    assert _matches(service["spec"]["selector"], engines["spec"]["template"]["metadata"]["labels"])
    assert not _matches(service["spec"]["selector"], rendered.workload("router")["spec"]["template"]["metadata"]["labels"])
    assert port == rendered.container("engine")["ports"][0]["containerPort"]

    router_service = rendered.one("Service", f"{rendered.fullname}-router")
    assert router_service["spec"]["ports"][0]["targetPort"] == "http"
    assert _matches(router_service["spec"]["selector"], rendered.workload("router")["spec"]["template"]["metadata"]["labels"])


def test_references_resolve(rendered):
    """Every Secret, ConfigMap, claim and service account a pod names is rendered by the chart
    (with the key it reads) or is the existing one the values name."""
    values = rendered.values
    existing_secrets = {values.get("auth", {}).get("existingSecret"),
                        values.get("adapterStore", {}).get("s3", {}).get("existingSecret"),
                        values.get("rateLimits", {}).get("redis", {}).get("existingSecret")} - {None, ""}
    for workload, template in _pod_specs(rendered):
        spec = template["spec"]
        assert spec["serviceAccountName"] in rendered.names("ServiceAccount")
        refs = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for c in spec["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        for volume in spec["volumes"]:
            if "secret" in volume:
                refs += [(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                existing = {values.get("persistence", {}).get("existingClaim")} | {  # and the user's own volumes'
                    v["persistentVolumeClaim"]["claimName"] for v in values.get("engine", {}).get("extraVolumes", [])
                    if "persistentVolumeClaim" in v}
                assert claim in rendered.names("PersistentVolumeClaim") | existing
        for name, key in refs:
            if name in existing_secrets:
                assert name not in rendered.names("Secret")
            else:
                assert key in rendered.secret_data(name), f"{workload} reads {name}[{key}], which the chart does not write"
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in rendered.names("ConfigMap")
            mounted = {m["name"] for m in container["volumeMounts"]}
            assert mounted == {v["name"] for v in spec["volumes"]}, "a volume is declared but not mounted, or the reverse"


def test_s3_settings_only_with_an_s3_store(rendered):
    store = rendered.values.get("adapterStore", {})
    engine_env, router_env = rendered.env("engine"), rendered.env("router")
    s3_names = {n for n in engine_env if n.startswith(("LORAGATE_S3_", "AWS_"))}
    assert not {n for n in router_env if n.startswith(("LORAGATE_S3_", "AWS_"))}
    keeps_limits = bool(rendered.values.get("rateLimits"))  # the router reads the keys only then
    assert bool({n for n in router_env if n.startswith(("LORAGATE_ADMIN", "LORAGATE_API"))}) == keeps_limits
    if store.get("type") != "s3":
        assert engine_env["LORAGATE_ADAPTER_STORE"] == "local" and not s3_names
        assert rendered.all("PersistentVolumeClaim") or rendered.values["persistence"]["existingClaim"]
        return
    s3 = store["s3"]
    assert engine_env["LORAGATE_ADAPTER_STORE"] == "s3"
    assert engine_env["LORAGATE_S3_BUCKET"] == s3["bucket"]
    assert engine_env["LORAGATE_S3_PREFIX"] == s3.get("prefix", "loragate/adapters")
    assert engine_env.get("LORAGATE_S3_ENDPOINT_URL") == s3.get("endpointUrl")
    assert engine_env.get("AWS_DEFAULT_REGION") == s3.get("region")
    has_credentials = bool(s3.get("accessKeyId") or s3.get("existingSecret"))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= s3_names if has_credentials else \
        not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & s3_names
    if s3.get("accessKeyId"):
        ref = engine_env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]
        assert rendered.secret_data(ref["name"])[ref["key"]] == s3["secretAccessKey"]


def test_settings_are_flags_the_server_accepts(rendered, monkeypatch):
    """Every LORAGATE_* variable the chart sets is a `loragate serve` setting, and the values
    parse and validate: the pods' configuration is what `loragate serve` would build."""
    from loragate.engine import EngineConfig
    from loragate.gateway.cli import build_parser
    from loragate.gateway.config_flags import dataclass_from_args
    from loragate.gateway.settings import GatewaySettings

    fields = {f"LORAGATE_{f.name.upper()}" for cls in (EngineConfig, GatewaySettings) for f in dataclasses.fields(cls)}
    for component in ("engine", "router"):
        env = rendered.env(component)
        unknown = {n for n in env if n.startswith("LORAGATE_")} - fields - {"LORAGATE_HOME"}
        assert not unknown, f"{component} sets variables loragate serve does not read: {sorted(unknown)}"
        for name in {n for n in fields if n.startswith("LORAGATE_")}:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            if isinstance(value, str):
                monkeypatch.setenv(name, value)
        args = build_parser().parse_args(rendered.container(component)["args"])
        settings = dataclass_from_args(GatewaySettings, args)
        assert settings.role == component and settings.port == 8000
        if component == "engine":
            config = dataclass_from_args(EngineConfig, args)
            assert config.model == env["LORAGATE_MODEL"] and config.num_threads >= 1


def test_autoscaling_targets_the_workloads(render):
    rendered = render(HPA_VALUES)
    for component, kind in (("engine", "StatefulSet"), ("router", "Deployment")):
        hpa = rendered.one("HorizontalPodAutoscaler", f"{rendered.fullname}-{component}")
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", kind)
        assert target["name"] == rendered.workload(component)["metadata"]["name"]
        assert "replicas" not in rendered.workload(component)["spec"]  # the HPA owns it
    assert rendered.one("HorizontalPodAutoscaler", f"{rendered.fullname}-engine")["spec"]["maxReplicas"] == 5


def test_disruption_budgets_and_service_monitor_select_the_right_objects(render):
    rendered = render(MONITORED_VALUES)
    for component in ("engine", "router"):
        pdb = rendered.one("PodDisruptionBudget", f"{rendered.fullname}-{component}")
        workload_labels = rendered.workload(component)["spec"]["template"]["metadata"]["labels"]
        assert _matches(pdb["spec"]["selector"]["matchLabels"], workload_labels)
    assert rendered.one("PodDisruptionBudget", f"{rendered.fullname}-router")["spec"]["maxUnavailable"] == "50%"

    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"  # what Prometheus selects monitors by
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [rendered.namespace]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s"
    scraped = {s["metadata"]["name"] for s in rendered.all("Service")
               if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])}
    # Router and every engine once: the engines' extra ClusterIP Service would scrape them twice.
    assert scraped == {f"{rendered.fullname}-router", f"{rendered.fullname}-engine-headless"}
    assert rendered.names("Service") - scraped == {f"{rendered.fullname}-engine"}
    for service in rendered.all("Service"):
        assert "http" in {p["name"] for p in service["spec"]["ports"]}


def test_notes_say_how_to_reach_the_api(rendered):
    assert f"svc/{rendered.fullname}-router" in rendered.notes or "loadBalancer" in rendered.notes
    limits = rendered.values.get("rateLimits", {})
    assert ("up to 2 times its limits" in rendered.notes) == bool(limits and not limits.get("redis"))
    assert ("share\n   their buckets in Redis" in rendered.notes) == bool(limits.get("redis"))
    assert "/readyz" in rendered.notes and "/metrics" in rendered.notes
    assert ("OPEN" in rendered.notes) == (rendered.values.get("auth", {}).get("enabled") is False)
    served = rendered.values.get("model", {}).get("servedName") or "smollm2-135m-instruct"  # the image's model
    served = served.split(",")[0]  # the others are aliases
    assert f'"model": "{served}"' in rendered.notes


def test_priorities_reasoning_and_prefix_routing_reach_the_servers_settings(render):
    from loragate.gateway.settings import GatewaySettings

    rendered = render(VALUE_SETS["priorities"][0])
    engine, router = rendered.env("engine"), rendered.env("router")
    settings = GatewaySettings(tenant_priorities=engine["LORAGATE_TENANT_PRIORITIES"],
                               reasoning_parser=engine["LORAGATE_REASONING_PARSER"])
    assert settings.tenant_priority_map() == {"gold": -1, "free": 2} and settings.reasoning_parser == "none"
    assert router["LORAGATE_PREFIX_ROUTING"] == "false"
    plain = render({})
    assert "LORAGATE_TENANT_PRIORITIES" not in plain.env("engine")
    assert (plain.env("engine")["LORAGATE_REASONING_PARSER"], plain.env("router")["LORAGATE_PREFIX_ROUTING"]) == \
        ("auto", "true")


def test_extra_volumes_carry_adapters_for_lora_modules(render):
    rendered = render(VALUE_SETS["preloaded-adapters"][0])
    path = rendered.env("engine")["LORAGATE_LORA_MODULES"].split("=", 1)[1]
    mounts = {m["name"]: m for m in rendered.container("engine")["volumeMounts"]}
    assert path.startswith(mounts["adapters"]["mountPath"] + "/") and mounts["adapters"]["readOnly"]
    volumes = {v["name"]: v for v in rendered.workload("engine")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == "team-adapters"
    assert "adapters" not in {m["name"] for m in render({}).container("engine")["volumeMounts"]}


def test_rate_limits_go_to_the_router_with_the_keys_and_the_tenants_file_it_reads(render, tmp_path):
    """The router keeps the fleet's rate limits (gateway/router_limits.py): it gets them, the
    keys file to tell tenants apart, and the tenants' own limits as a file; engines get none."""
    from loragate.gateway.rate_limits import load_tenant_limits

    rendered = render(VALUE_SETS["rate-limits"][0])
    env = rendered.env("router")
    assert (env["LORAGATE_TENANT_REQUESTS_PER_MINUTE"], env["LORAGATE_TENANT_TOKENS_PER_MINUTE"]) == ("120", "50000")
    assert not any(n.startswith("LORAGATE_TENANT_") for n in rendered.env("engine"))
    assert env["LORAGATE_API_KEYS_FILE"] == rendered.env("engine")["LORAGATE_API_KEYS_FILE"]
    assert env["LORAGATE_ADMIN_KEY"] == rendered.env("engine")["LORAGATE_ADMIN_KEY"]  # a secretKeyRef
    mounts = {m["name"]: m["mountPath"] for m in rendered.container("router")["volumeMounts"]}
    assert env["LORAGATE_API_KEYS_FILE"].startswith(mounts["auth"] + "/")
    assert "checksum/secrets" in rendered.workload("router")["spec"]["template"]["metadata"]["annotations"]
    mount = next(m for m in rendered.container("router")["volumeMounts"] if m["name"] == "rate-limits")
    volume = next(v for v in rendered.workload("router")["spec"]["template"]["spec"]["volumes"] if v["name"] == "rate-limits")
    path = env["LORAGATE_TENANT_RATE_LIMITS_FILE"]
    assert path.startswith(mount["mountPath"] + "/")
    config_map = next(c for c in rendered.all("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"])
    local = tmp_path / "limits.json"
    local.write_text(config_map["data"][path.rsplit("/", 1)[1]])
    assert load_tenant_limits(str(local)) == {"team-a": {"requests": 600, "tokens": 200000}, "trial": {"tokens": 5000}}
    assert "LORAGATE_RATE_LIMIT_REDIS_URL" not in env  # each router keeps its own buckets
    shared = render(VALUE_SETS["rate-limits-redis"][0]).env("router")["LORAGATE_RATE_LIMIT_REDIS_URL"]
    assert shared == {"secretKeyRef": {"name": "redis-auth", "key": "rate-limit-url"}}
    url = render({"rateLimits": {"requestsPerMinute": 60, "redis": {"url": "redis://redis-master.redis:6379/0"}}})
    assert url.env("router")["LORAGATE_RATE_LIMIT_REDIS_URL"] == "redis://redis-master.redis:6379/0"
    assert "LORAGATE_RATE_LIMIT_REDIS_URL" not in url.env("engine")
    unused = render({"rateLimits": {"redis": {"url": "redis://redis-master.redis:6379/0"}}})  # no limits to share
    assert "LORAGATE_RATE_LIMIT_REDIS_URL" not in unused.env("router")
    plain = render({})  # no limits: the router needs no keys
    assert not any(n.startswith(("LORAGATE_TENANT_", "LORAGATE_API_KEYS", "LORAGATE_ADMIN")) for n in plain.env("router"))
    assert "auth" not in {m["name"] for m in plain.container("router")["volumeMounts"]}


def test_adding_a_key_restarts_no_pod_but_a_new_admin_key_does(render):
    """Servers read the mounted keys file again while they run (gateway/auth.py), so new
    auth.apiKeys only change the Secret; the admin key is an environment variable."""
    def checksums(auth):
        rendered = render({"auth": auth, "rateLimits": {"requestsPerMinute": 60}})
        return [rendered.workload(c)["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
                for c in ("engine", "router")]

    one = {"apiKeys": [{"key": "sk-team-a-0123456789", "tenant": "team-a"}], "adminKey": "sk-admin-0123456789"}
    two = {**one, "apiKeys": [*one["apiKeys"], {"key": "sk-team-b-0123456789", "tenant": "team-b"}]}
    assert checksums(one) == checksums(two)
    assert all(a != b for a, b in zip(checksums(one), checksums({**one, "adminKey": "sk-admin-other-123456"})))


def test_tracing_reaches_the_router_and_the_engines(render):
    rendered = render(VALUE_SETS["tracing"][0])
    for component in ("router", "engine"):
        assert rendered.env(component)["LORAGATE_OTLP_TRACES_ENDPOINT"] == \
            "http://otel-collector.observability:4318/v1/traces"
    assert "LORAGATE_OTLP_TRACES_ENDPOINT" not in render({}).env("engine")


def test_audit_log_timings_and_shared_tenant_reach_the_engines_settings(render):
    from loragate.gateway.settings import GatewaySettings

    rendered = render(VALUE_SETS["audit-timings-shared"][0])
    engine = rendered.env("engine")
    settings = GatewaySettings(audit_log=engine["LORAGATE_AUDIT_LOG"],
                               enable_per_request_metrics=engine["LORAGATE_ENABLE_PER_REQUEST_METRICS"] == "true",
                               shared_adapters_tenant=engine["LORAGATE_SHARED_ADAPTERS_TENANT"])
    assert (settings.audit_log, settings.enable_per_request_metrics, settings.shared_adapters_tenant) == \
        ("-", True, "public")
    names = ("LORAGATE_AUDIT_LOG", "LORAGATE_ENABLE_PER_REQUEST_METRICS", "LORAGATE_SHARED_ADAPTERS_TENANT")
    assert not set(names) & set(rendered.env("router")) and not set(names) & set(render({}).env("engine"))


def test_the_grafana_dashboard_is_a_configmap_for_grafanas_sidecar(render, chart_dir):
    """The dashboard's own metric names are checked against running servers in
    tests/gateway/test_grafana_dashboard.py."""
    import json

    rendered = render(MONITORED_VALUES)
    board = rendered.one("ConfigMap", f"{rendered.fullname}-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert board["data"]["loragate.json"] == (Path(chart_dir) / "dashboards" / "loragate.json").read_text()
    dashboard = json.loads(board["data"]["loragate.json"])
    assert dashboard["uid"] == "loragate-overview" and len(dashboard["panels"]) > 10
    assert f"{render({}).fullname}-dashboard" not in render({}).names("ConfigMap")  # off by default
