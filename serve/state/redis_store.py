"""The shared state store for clusters: Redis (redis-py), every write one Lua script (atomic on the server).

Keys (under the prefix, default `vita-audio:`):
- `r:<kind>:<id>`: the item, a hash (kind, id, owner, name, name_key, data (JSON text), created_at, expires_at,
  version); its Redis TTL (`PEXPIREAT`) is the item's expiry, so an expired item is gone for every reader at once.
  A compare-and-set (`if_version`) compares and bumps `version` inside the put or touch script.
- `n:<kind>:<scope>:<name>`: the id holding a name (scope: the owner id, or `*` for global names), created only
  where absent inside the create script, with the item's TTL: of concurrent creates of one name exactly one wins.
- `i:<kind>:<owner>`: the owner's ids of a kind, a sorted set scored by expiry (ms; +inf: none), for listing and
  the per-owner cap; entries past their expiry are dropped by every write.
Lua scripts read the name key named in the item (`name_key`), so this is for a single Redis server (or one with
replicas and failover), not Redis Cluster.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from serve.state import (OWNER, Conflict, Full, NotFound, Record, Stale, StateError, StateStore, check_id,
                         check_kind, check_name, check_owner, check_version, encode_data, expiry, new_id, scope_key)

DEFAULT_PREFIX = "vita-audio:"

NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: item, index, name key (the item key again when unnamed)
# ARGV: kind, id, owner, name, data, created_at, exp_ms (0: none), max_items (0: none), expires_at text, named
CREATE = NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'id' end
local named = ARGV[10] == '1'
if named and redis.call('EXISTS', KEYS[3]) == 1 then return 'name' end
local exp = tonumber(ARGV[7])
if exp > 0 and exp <= now then return 'past' end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cap = tonumber(ARGV[8])
if cap > 0 and redis.call('ZCARD', KEYS[2]) >= cap then return 'full' end
local name_key = ''
if named then name_key = KEYS[3] end
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'id', ARGV[2], 'owner', ARGV[3], 'name', ARGV[4], 'data', ARGV[5],
           'created_at', ARGV[6], 'expires_at', ARGV[9], 'name_key', name_key, 'version', 1)
if named then redis.call('SET', KEYS[3], ARGV[2]) end
if exp > 0 then
  redis.call('PEXPIREAT', KEYS[1], exp)
  if named then redis.call('PEXPIREAT', KEYS[3], exp) end
  redis.call('ZADD', KEYS[2], exp, ARGV[2])
else
  redis.call('ZADD', KEYS[2], '+inf', ARGV[2])
end
return 'ok'
"""

# the item's new expiry (exp, ms; 0: none) on its key, its name key and its owner's index, and its version
# bumped to `version`; ARGV[2] is the id
SET_EXPIRY = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('HSET', KEYS[1], 'version', version)
local name_key = redis.call('HGET', KEYS[1], 'name_key')
if exp > 0 then
  redis.call('PEXPIREAT', KEYS[1], exp)
  if name_key and name_key ~= '' then redis.call('PEXPIREAT', name_key, exp) end
  redis.call('ZADD', KEYS[2], exp, ARGV[2])
else
  redis.call('PERSIST', KEYS[1])
  if name_key and name_key ~= '' then redis.call('PERSIST', name_key) end
  redis.call('ZADD', KEYS[2], '+inf', ARGV[2])
end
"""

# the owned item's next version, or a refusal: {'notfound'} / {'stale', current}.  owner_arg, want (0: any)
NEXT_VERSION = """
local function next_version(owner_arg, want)
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if not owner then
    if want > 0 then return nil, {'notfound'} end
    return 1, nil
  end
  if owner ~= owner_arg then return nil, {'notfound'} end
  local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '1')
  if want > 0 and current ~= want then return nil, {'stale', tostring(current)} end
  return current + 1, nil
end
"""

# KEYS: item, index.  ARGV: kind, id, owner, data, created_at, exp_ms (0: none), expires_at text, if_version (0: any)
PUT = NOW_MS + NEXT_VERSION + """
local exp = tonumber(ARGV[6])
if exp > 0 and exp <= now then return {'past'} end
local version, refused = next_version(ARGV[3], tonumber(ARGV[8]))
if refused then return refused end
if version == 1 then
  redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'id', ARGV[2], 'owner', ARGV[3], 'name', '', 'name_key', '',
             'created_at', ARGV[5])
end
redis.call('HSET', KEYS[1], 'data', ARGV[4], 'expires_at', ARGV[7])
""" + SET_EXPIRY + """
local fields = redis.call('HMGET', KEYS[1], 'name', 'created_at')
return {'ok', fields[1], fields[2], version}
"""

# KEYS: item, index.  ARGV: owner, id, exp_ms (0: none), expires_at text, if_version (0: any)
TOUCH = NOW_MS + NEXT_VERSION + """
local exp = tonumber(ARGV[3])
if exp > 0 and exp <= now then return {'past'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound'} end
local version, refused = next_version(ARGV[1], tonumber(ARGV[5]))
if refused then return refused end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[4])
""" + SET_EXPIRY + """
return {'ok', version}
"""

# KEYS: item, index.  ARGV: owner, id
DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or owner ~= ARGV[1] then return 0 end
local name_key = redis.call('HGET', KEYS[1], 'name_key')
if name_key and name_key ~= '' and redis.call('GET', name_key) == ARGV[2] then redis.call('DEL', name_key) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


def split_url(url: str) -> tuple[str, str]:
    """(the URL for redis-py, the key prefix from its `prefix=` query parameter)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def _ms(expires_at: float | None) -> int:
    return 0 if expires_at is None else int(expires_at * 1000)


class RedisStore(StateStore):
    def __init__(self, url: str, socket_timeout_s: float = 10.0):
        self.url = url
        self.client_url, self.prefix = split_url(url)
        self.socket_timeout_s = socket_timeout_s
        self._client = None
        self._pid = None
        self._scripts = {}

    # -- connection -----------------------------------------------------------------------------------------
    def _redis(self):
        if self._client is None or self._pid != os.getpid():
            import redis

            self._client = redis.Redis.from_url(self.client_url, decode_responses=True,
                                                socket_timeout=self.socket_timeout_s,
                                                socket_connect_timeout=self.socket_timeout_s,
                                                health_check_interval=30)
            self._scripts = {name: self._client.register_script(src)
                             for name, src in (("create", CREATE), ("put", PUT), ("touch", TOUCH),
                                               ("delete", DELETE))}
            self._pid = os.getpid()
        return self._client

    def _script(self, name: str, keys: list[str], args: list):
        self._redis()
        return self._scripts[name](keys=keys, args=args)

    def _item_key(self, kind: str, item_id: str) -> str:
        return f"{self.prefix}r:{kind}:{item_id}"

    def _index_key(self, kind: str, owner: str) -> str:
        return f"{self.prefix}i:{kind}:{owner}"

    def _name_key(self, kind: str, scope: str, owner: str, name: str) -> str:
        return f"{self.prefix}n:{kind}:{scope_key(scope, owner)}:{name}"

    @staticmethod
    def _record(h: dict) -> Record:
        expires = h.get("expires_at") or None
        return Record(h["kind"], h["id"], h["owner"], json.loads(h["data"]), h.get("name") or None,
                      float(h["created_at"]), float(expires) if expires else None, int(h.get("version") or 1))

    # -- operations -----------------------------------------------------------------------------------------
    def create(self, kind: str, owner: str, data: Any, *, id: str | None = None, name: str | None = None,
               scope: str = OWNER, expires_at: float | None = None, ttl_s: float | None = None,
               max_items: int | None = None) -> Record:
        check_kind(kind), check_owner(owner), check_name(name)
        item_id = check_id(id) if id is not None else new_id(kind)
        now = time.time()
        expires = expiry(expires_at, ttl_s, now)
        item_key = self._item_key(kind, item_id)
        name_key = self._name_key(kind, scope, owner, name) if name is not None else item_key
        out = self._script("create", [item_key, self._index_key(kind, owner), name_key],
                           [kind, item_id, owner, name or "", encode_data(data), repr(now), _ms(expires),
                            max_items or 0, "" if expires is None else repr(expires), "1" if name is not None else "0"])
        if out == "id":
            raise Conflict(f"{kind} {item_id!r} already exists", "id")
        if out == "name":
            raise Conflict(f"a {kind} named {name!r} already exists", "name")
        if out == "full":
            raise Full(f"the {kind} store is full ({max_items} per key); delete one first")
        if out == "past":
            raise ValueError(f"expires_at={expires} is not in the future (by the Redis server's clock)")
        return Record(kind, item_id, owner, data, name, now, expires)

    def put(self, kind: str, owner: str, id: str, data: Any, *, expires_at: float | None = None,
            ttl_s: float | None = None, if_version: int | None = None) -> Record:
        check_kind(kind), check_owner(owner), check_id(id), check_version(if_version)
        now = time.time()
        expires = expiry(expires_at, ttl_s, now)
        out = self._script("put", [self._item_key(kind, id), self._index_key(kind, owner)],
                           [kind, id, owner, encode_data(data), repr(now), _ms(expires),
                            "" if expires is None else repr(expires), if_version or 0])
        self._refused(out, kind, id, expires, if_version)
        return Record(kind, id, owner, data, out[1] or None, float(out[2]), expires, int(out[3]))

    def touch(self, kind: str, owner: str, id: str, *, expires_at: float | None = None, ttl_s: float | None = None,
              if_version: int | None = None) -> int:
        check_kind(kind), check_owner(owner), check_id(id), check_version(if_version)
        expires = expiry(expires_at, ttl_s, time.time())
        out = self._script("touch", [self._item_key(kind, id), self._index_key(kind, owner)],
                           [owner, id, _ms(expires), "" if expires is None else repr(expires), if_version or 0])
        self._refused(out, kind, id, expires, if_version)
        return int(out[1])

    @staticmethod
    def _refused(out: list, kind: str, id: str, expires: float | None, if_version: int | None) -> None:
        """A put or touch script's refusal, raised."""
        if out[0] == "notfound":
            raise NotFound(f"{kind} {id!r} does not exist")
        if out[0] == "stale":
            raise Stale(f"{kind} {id!r} is at version {out[1]}, not {if_version}")
        if out[0] == "past":
            raise ValueError(f"expires_at={expires} is not in the future (by the Redis server's clock)")

    def get(self, kind: str, owner: str, id: str) -> Record:
        check_kind(kind), check_id(id)
        found = self._redis().hgetall(self._item_key(kind, id))
        if not found or found.get("owner") != owner:
            raise NotFound(f"{kind} {id!r} does not exist")
        record = self._record(found)
        if not record.live():  # the server's TTL has it gone already; this guards against clock skew
            raise NotFound(f"{kind} {id!r} does not exist")
        return record

    def find(self, kind: str, owner: str, name: str, *, scope: str = OWNER) -> Record:
        check_kind(kind), check_name(name)
        item_id = self._redis().get(self._name_key(kind, scope, owner, name))
        try:
            if item_id is None:
                raise NotFound
            return self.get(kind, owner, item_id)
        except NotFound:
            raise NotFound(f"no {kind} named {name!r}") from None

    def list(self, kind: str, owner: str) -> list[Record]:
        check_kind(kind)
        client = self._redis()
        ids = client.zrangebyscore(self._index_key(kind, owner), f"({int(time.time() * 1000)}", "+inf")
        if not ids:
            return []
        pipe = client.pipeline(transaction=False)
        for item_id in ids:
            pipe.hgetall(self._item_key(kind, item_id))
        records = [self._record(h) for h in pipe.execute() if h and h.get("owner") == owner]
        return sorted((r for r in records if r.live()), key=lambda r: (r.created_at, r.id))

    def delete(self, kind: str, owner: str, id: str) -> None:
        check_kind(kind), check_id(id)
        if not self._script("delete", [self._item_key(kind, id), self._index_key(kind, owner)], [owner, id]):
            raise NotFound(f"{kind} {id!r} does not exist")

    def check(self) -> None:
        import redis

        try:
            self._redis().ping()
        except redis.RedisError as err:
            raise StateError(f"state store {self.client_url}: {err}") from None

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None
