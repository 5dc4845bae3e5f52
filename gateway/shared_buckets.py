"""Tenants' rate-limit buckets kept in Redis, so that every router replica draws on one
allowance per tenant (router_limits.py; Helm runs two routers by default).

They are rate_limits.py's buckets: a minute's allowance, refilled continuously, taken per
request and per token. One Lua script refills, checks and takes atomically inside Redis, so
two routers admitting at the same moment cannot both take the last request. Its clock is
Redis's (TIME), so the routers' clocks need not agree. A bucket's key expires once the bucket
would be full again, so a missing key is a full bucket and idle tenants leave nothing behind.
Keys are `<prefix>{<tenant>}:<kind>`: a tenant's two buckets share a Redis Cluster slot.
"""

from __future__ import annotations

from loragate.engine.errors import ModelConfigError

from .rate_limits import KINDS

# KEYS: the buckets; ARGV: for each its limit and the amount to take, then 1 to take nothing
# unless every bucket holds at least 1 (admission), 0 to take regardless (a charge). Returns
# whether it took, then each bucket's level (as text: Redis turns a Lua number into an integer).
_APPLY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local levels = {}
local took = 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local b = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = limit
  if b[1] then
    level = math.min(limit, tonumber(b[1]) + math.max(now - tonumber(b[2]), 0) * limit / 60)
  end
  levels[i] = level
  if ARGV[2 * n + 1] == '1' and level < 1 then
    took = 0
  end
end
local out = {took}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  if took == 1 then
    levels[i] = levels[i] - tonumber(ARGV[2 * i])
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'at', tostring(now))
    redis.call('EXPIRE', KEYS[i], math.ceil((limit - levels[i]) * 60 / limit) + 1)
  end
  out[i + 1] = tostring(levels[i])
end
return out
"""


class RedisBuckets:
    def __init__(self, url: str, prefix: str = "loragate:ratelimit:", timeout: float = 0.5, client=None):
        """url: redis://[:password@]host:port/db, rediss:// (TLS) or unix://; `timeout` (seconds)
        bounds every call, so a Redis that stops answering delays a request by at most that."""
        try:
            import redis.asyncio
        except ImportError:
            raise ModelConfigError("rate_limit_redis_url needs the redis package: pip install 'loragate[redis]'") \
                from None
        self._no_script = redis.exceptions.NoScriptError
        if client is None:
            client = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.client, self.prefix = client, prefix
        self._sha: str | None = None  # of the script, once Redis has it

    async def apply(self, tenant: str, limits: dict[str, int], takes: dict[str, int],
                    check: bool) -> tuple[bool, dict[str, float]]:
        """Refill `tenant`'s buckets of the set `limits` (kind -> per minute), then take `takes`
        (kind -> amount) from them: only if each holds at least 1 when `check`. Returns whether
        it took, and each bucket's level after."""
        kinds = [kind for kind in KINDS if limits.get(kind)]
        if not kinds:
            return True, {}
        keys = [f"{self.prefix}{{{tenant}}}:{kind}" for kind in kinds]
        args = [x for kind in kinds for x in (limits[kind], takes.get(kind, 0))] + [int(check)]
        took, *levels = await self._run(keys, args)
        return took == 1, {kind: float(level) for kind, level in zip(kinds, levels)}

    async def _run(self, keys: list[str], args: list[int]) -> list:
        if self._sha is None:
            self._sha = await self.client.script_load(_APPLY)
        try:
            return await self.client.evalsha(self._sha, len(keys), *keys, *args)
        except self._no_script:  # Redis restarted or flushed its scripts: EVAL sends (and caches) it again
            return await self.client.eval(_APPLY, len(keys), *keys, *args)

    async def close(self) -> None:
        await self.client.aclose()
