"""The chart's API-keys Secret is what `loragate serve` reads: a keys file the server's KeyStore
parses into the configured tenants, and an admin key, generated when none is given."""

from __future__ import annotations


def test_api_keys_secret_is_what_the_server_reads(render, tmp_path):
    from loragate.gateway.auth import KeyStore

    keys = [{"key": "sk-team-a-0123456789", "tenant": "team-a"}, {"key": "sk-team-b-9876543210", "tenant": "team.b"}]
    rendered = render({"auth": {"apiKeys": keys, "adminKey": "admin-0123456789"}})
    env = rendered.env("engine")
    mount = next(m for m in rendered.container("engine")["volumeMounts"] if m["name"] == "auth")
    volume = next(v for v in rendered.workload("engine")["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth")
    (item,) = volume["secret"]["items"]
    assert env["LORAGATE_API_KEYS_FILE"] == f"{mount['mountPath']}/{item['path']}"

    data = rendered.secret_data(volume["secret"]["secretName"])
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(data[item["key"]])
    admin_ref = env["LORAGATE_ADMIN_KEY"]["secretKeyRef"]
    store = KeyStore.from_sources(str(keys_file), None, rendered.secret_data(admin_ref["name"])[admin_ref["key"]])
    for k in keys:
        assert store.authenticate(f"Bearer {k['key']}").tenant == k["tenant"]
    assert store.authenticate("Bearer admin-0123456789").is_admin


def test_admin_key_is_generated_when_none_is_given(render):
    rendered = render({})
    admin_key = rendered.secret_data(f"{rendered.fullname}-auth")["admin-key"]
    assert len(admin_key) >= 40 and admin_key.isascii() and " " not in admin_key
    assert f"get secret {rendered.fullname}-auth" in rendered.notes
