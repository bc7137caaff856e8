"""Per-identity Edge state, kept the way Adobe's mobile SDKs keep it (reference §4-§5), as pure functions.

`state:store` entries live until `receive time + maxAge`; `maxAge <= 0` deletes the key; a new entry with the same
key replaces the old one. An entry without `maxAge` lives for the session (Adobe, "Client state management": "When
missing, entries should be stored only for the current session"), SESSION_ENTRY_S after the identity's latest answer,
where the mobile SDKs drop it. The `EdgeNetwork` location hint lives for `ttlSeconds` and is left alone by a response
that carries none.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from relay import codec

# What is kept of an answer, so that no answer can break the identity's next events (reference §4-§5):
HINT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")  # Edge's hints ("or2", "va6", "irl1"): a URL path part
MAX_LIFETIME_S = 5 * 365 * 86400  # above any Edge lifetime (the identity entry: 395 days); keeps expiries finite
MAX_HINT_TTL_S = 2 * 3600  # four times Edge's 30 minutes: a wrong hint cannot stick for long
MAX_ENTRY_BYTES = 4096  # key, value and attrs of one entry: what a browser keeps of one cookie (Web SDK state)
MAX_STATE_BYTES = 16 * 1024  # all entries: sent back inside Edge's 64 KB request, stored inside one small item
# How long an entry Edge gave without `maxAge` (a session entry, such as `..._personalization_sessionId`) is kept after
# the identity's latest answer: Edge's session, the 30 minutes its location hint lives and every answer extends.
SESSION_ENTRY_S = 1800.0
# The Web SDK's routing cookie, `kndctr_<org id, "@" as "_">_cluster`, which Edge also sets as a `state:store` entry.
CLUSTER_KEY = re.compile(r"kndctr_[A-Za-z0-9_]+_AdobeOrg_cluster")
# What Edge issues ("or2", "va6", "irl1"): a caller's cluster value must look like one to route a call.
EDGE_HINT = re.compile(r"[a-z0-9]{1,16}")


# How long a deletion Edge answered is remembered (`IdentityState.deleted`): longer than an invocation can last (900 s),
# so that an older answer merged after a write conflict, which is at most that old, cannot put back what Edge deleted.
DELETION_MEMORY_S = 1800.0
MAX_DELETIONS = 32  # remembered at once, the latest (Edge deletes a few keys, not dozens)
MAX_DELETED_KEY_BYTES = 256  # a longer key's deletion is not remembered: the item stays small

EXTENSION_DUE_SHARE = 0.1  # of a lifetime: an expiry extension is written once this much of it has passed


def _unwritten_extension(lifetime: float) -> float:
    """How far past a stored expiry Edge's may be: an extension is written only once it is due (`needs_write`), so
    an answer that extended it by less than this share of its lifetime may not have been written."""
    return EXTENSION_DUE_SHARE * max(lifetime, 0.0)


def _hint_ttl(lifetime: float) -> float:
    """A hint's lifetime as kept: not below 0, nor above MAX_HINT_TTL_S."""
    return float(min(max(lifetime, 0), MAX_HINT_TTL_S))


def valid_hint(hint: Any) -> bool:
    """A location hint safe to put in the URL path: letters, digits and dashes, as Edge's are."""
    return isinstance(hint, str) and HINT_PATTERN.fullmatch(hint) is not None


def _lifetime(value: Any) -> float | None:
    """A `maxAge`/`ttlSeconds` in seconds (capped at MAX_LIFETIME_S), or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):  # JSON's integers are Python's: one too large for a float must not raise
        return float(max(min(value, MAX_LIFETIME_S), -MAX_LIFETIME_S))
    return min(value, MAX_LIFETIME_S) if math.isfinite(value) else None


def _entry_bytes(key: str, entry: StoredEntry) -> int:
    """Its size in UTF-8, as sent (a lone surrogate, which Edge's JSON can carry, as its 6-byte escape)."""
    attrs = codec.dumps(entry.attrs) if entry.attrs else ""  # as the request carries it (surrogates escaped)
    return sum(len(codec.text(text).encode("utf-8")) for text in (key, entry.value)) + len(attrs.encode("utf-8"))


def opaque_identity_id(namespace: str, identity: str, key: bytes | None = None) -> str:
    """A stable key for an identity that never contains its value: HMAC-SHA256 of namespace and id with the
    deployment's identity key (`IDENTITY_KEY_SECRET_ID`), so that whoever reads the table cannot test guesses (an
    email, a phone number) against it. Without a key, plain SHA-256 (guessable for such identities: README)."""
    data = f"{namespace}\x1f{identity}".encode()
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class StoredEntry:
    value: str
    expires_at: float
    max_age: int
    attrs: dict[str, Any] | None = None
    # Given without `maxAge`: kept for the session (SESSION_ENTRY_S, extended by every answer for the identity) and sent
    # back without one, as the Web SDK sends a session cookie. Its expiry then says when the session ends, not when
    # Edge gave the value: that is `set_at` (what an older answer merged after a write conflict is compared with).
    session: bool = False
    set_at: float = 0.0

    def set_after(self, now: float) -> bool:
        """Whether an answer later than one at `now` set it (`_set_after`)."""
        if self.session:
            return self.set_at > now + SET_AT_TOLERANCE_S
        return _set_after(self.expires_at, self.max_age, now)


STATE_FORMAT = 1  # the state item's `stateFormat`: a later version that changes the item's format raises it


@dataclass(frozen=True)
class IdentityState:
    entries: dict[str, StoredEntry] = field(default_factory=dict)
    hint: str | None = None
    hint_expires_at: float = 0.0
    version: int = 0  # optimistic-concurrency version of the stored item; 0 = not stored yet
    # A stored `version` that is a number but not one the relay writes (0, -1, 3.5: an item edited by hand), as read:
    # with `version` unreadable, the next write is conditioned on finding exactly this.
    stored_version: str | None = None
    # Written by a later relay version in a format this one does not know (`stateFormat` above STATE_FORMAT, as after a
    # rollback): nothing of it is sent, and it is never written over, which would lose what that version keeps.
    newer_format: bool = False
    hint_ttl: float = 0.0  # the hint's lifetime (`ttlSeconds`) when stored; 0 when not known (an item written before)
    # Keys an answer deleted (or replaced by an entry too large to keep), with that answer's time, for
    # DELETION_MEMORY_S: an entry leaves no set time behind to tell an older answer's from a later one (`_set_after`)
    deleted: dict[str, float] = field(default_factory=dict)

    def live_entries(self, now: float) -> dict[str, StoredEntry]:
        return {k: e for k, e in self.entries.items() if e.expires_at > now}

    def live_hint(self, now: float) -> str | None:
        return self.hint if self.hint and self.hint_expires_at > now else None

    # What routes a call: the hint and the cluster entry are used for up to a tenth of their lifetime past the stored
    # expiry (3 minutes for Edge's 30), the most an answer's extension that was not yet due to be written can add.
    # Without it, a visitor whose next event comes within that tenth after the stored expiry, but before Edge's,
    # would change region mid-session (reference §4). With no answer in between, the route outlives Edge's by as much
    # (the visitor goes where the last session was). Other entries (identity, consent) are never sent past it.

    def sendable_entries(self, now: float) -> dict[str, StoredEntry]:
        """The entries to send back: the live ones, and a cluster entry while Edge's expiry may not have passed."""
        return {k: e for k, e in self.entries.items() if e.expires_at > now or _sent_until(k, e) > now}

    def hint_lifetime(self) -> float:
        """The hint's lifetime: as stored, or, for an item written before it was (no `hintTtl`), that of the cluster
        entry Edge set with it (the same value, the same `maxAge`), so that the two routes end together; else 0."""
        if self.hint_ttl or not self.hint:
            return self.hint_ttl
        cluster = [e.max_age for k, e in self.entries.items() if CLUSTER_KEY.fullmatch(k) and e.value == self.hint]
        return _hint_ttl(cluster[0]) if cluster else 0.0

    def _routes_until(self) -> float:
        """Until when the hint routes a call (0 without one)."""
        return self.hint_expires_at + _unwritten_extension(self.hint_lifetime()) if self.hint else 0.0

    def route_hint(self, now: float) -> str | None:
        """The hint to route by: the live one, or one whose expiry Edge may have extended without a write."""
        return self.hint if self._routes_until() > now else None

    def expires_at(self) -> float:
        """When the last entry or the hint stops being sent or routing a call, or a deletion is forgotten: the item's
        TTL."""
        forgotten = [t + DELETION_MEMORY_S for t in self.deleted.values()]
        return max([_sent_until(k, e) for k, e in self.entries.items()] + [self._routes_until(), 0.0, *forgotten])


def _sent_until(key: str, entry: StoredEntry) -> float:
    """Until when an entry is sent back: its expiry, and for the cluster entry, which routes calls, and a session
    entry, which every answer extends, what an extension not yet written may have added to it (so a session entry
    lives at least SESSION_ENTRY_S after the identity's latest answer, and at most a tenth longer)."""
    graced = entry.session or CLUSTER_KEY.fullmatch(key)
    return entry.expires_at + (_unwritten_extension(entry.max_age) if graced else 0.0)


def caller_hint(caller_entries: list[dict[str, Any]]) -> str | None:
    """The location hint in a cluster entry the caller sent (a browser's cookie forwarded with the event), or None.

    Adobe's Web SDK routes by that entry alone; the caller's entries win over stored ones, so its cluster wins over the
    stored hint too: the call goes where the visitor's session is, not elsewhere with the visitor's cluster entry."""
    for entry in caller_entries:
        value, max_age = entry.get("value"), entry.get("maxAge")
        if isinstance(max_age, int | float) and max_age <= 0:
            continue  # the caller deletes it (`maxAge <= 0`): nothing to route by
        if CLUSTER_KEY.fullmatch(str(entry.get("key"))) and isinstance(value, str) and EDGE_HINT.fullmatch(value):
            return value
    return None


def outgoing_entries(state: IdentityState, caller_entries: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """`meta.state.entries` to send: stored entries (`IdentityState.sendable_entries`), with the caller's own entries
    winning by key."""
    caller_keys = {e["key"] for e in caller_entries}
    stored = [
        {"key": key, "value": entry.value} | ({} if entry.session else {"maxAge": max(int(entry.expires_at - now), 1)})
        for key, entry in sorted(state.sendable_entries(now).items())
        if key not in caller_keys
    ]
    return stored + list(caller_entries)


# How much later than an answer a stored entry or hint must have been set to be taken for a later answer's: the
# stored times are kept to the millisecond.
SET_AT_TOLERANCE_S = 0.001


def _set_after(expires_at: float, lifetime: float, now: float) -> bool:
    """Whether an entry or hint that lapses at `expires_at` after `lifetime` was set by an answer later than one at
    `now`: another invocation's, for the same identity, which wrote first; the answer at `now` is merged onto it after
    its own write met that one (`update_state`), and must not put back what Edge has since replaced or deleted. Its set
    time is its expiry less its lifetime (an entry's kept in whole seconds: with a fractional `maxAge` it reads up to a
    second late; one without a lifetime tells none)."""
    return lifetime > 0 and expires_at - lifetime > now + SET_AT_TOLERANCE_S


def apply_handles(state: IdentityState, handles: list[dict[str, Any]], now: float) -> IdentityState:
    """Fold one Edge response's `state:store` and `locationHint:result` handles into the state.

    An entry or hint a later answer set, or an entry it deleted (another invocation's answer, merged onto here), is
    not replaced, deleted or set again by this older one. What cannot be kept safely is left out: an entry whose value
    is not a string or whose lifetime is not a number, an entry over MAX_ENTRY_BYTES (the older entry under its key
    goes too: Edge replaced it), a hint that is not a plain name. If the entries together pass MAX_STATE_BYTES, those
    that lapse first are dropped (the long-lived identity entry stays)."""
    # What is still sent or routes a call (a cluster entry or hint in its grace included): an answer that deletes or
    # replaces it must take it out of what is stored, not only out of what is live.
    entries = state.sendable_entries(now)
    deleted = {key: at for key, at in state.deleted.items() if at + DELETION_MEMORY_S > now}
    hint, hint_expires_at, hint_ttl = state.hint, state.hint_expires_at, state.hint_lifetime()
    hint_seen = False
    for handle in handles:
        if not isinstance(handle, dict):
            continue
        payload = handle["payload"] if isinstance(handle.get("payload"), list) else []
        if handle.get("type") == "state:store":
            for item in payload:
                if not (isinstance(item, dict) and isinstance(item.get("key"), str)):
                    continue
                session = item.get("maxAge") is None  # absent (or null): kept for the session
                max_age = SESSION_ENTRY_S if session else _lifetime(item.get("maxAge"))
                stored = entries.get(item["key"])
                if max_age is None or (stored is not None and stored.set_after(now)):
                    continue
                if deleted.get(item["key"], -math.inf) > now + SET_AT_TOLERANCE_S:
                    continue  # a later answer deleted it
                if max_age <= 0:
                    # Remembered whether or not it was held (an older answer merged later may have set it), written
                    # with the next change: never a write of its own
                    entries.pop(item["key"], None)
                    deleted[item["key"]] = now
                    continue
                if not isinstance(item.get("value"), str):
                    continue
                attrs = item.get("attrs") if isinstance(item.get("attrs"), dict) else None
                expires_at = now + max_age
                if session and stored is not None and stored.session:
                    expires_at = max(expires_at, stored.expires_at)  # a later answer's session goes on
                entry = StoredEntry(
                    item["value"], expires_at, int(max_age), attrs or None, session, now if session else 0.0
                )
                if _entry_bytes(item["key"], entry) <= MAX_ENTRY_BYTES:
                    entries[item["key"]] = entry
                    deleted.pop(item["key"], None)
                else:  # not kept; nor the value it replaces, which Edge no longer wants sent
                    entries.pop(item["key"], None)
                    deleted[item["key"]] = now
        elif handle.get("type") == "locationHint:result" and not hint_seen:
            for item in payload:
                if isinstance(item, dict) and item.get("scope") == "EdgeNetwork":
                    ttl = _lifetime(item.get("ttlSeconds"))
                    # A stored hint Edge gave in a later answer (merged here after a write conflict) stands.
                    later = bool(hint) and _set_after(hint_expires_at, hint_ttl, now)
                    if valid_hint(item.get("hint")) and ttl is not None and not later:
                        hint_ttl = _hint_ttl(ttl)
                        hint, hint_expires_at = item["hint"], now + hint_ttl
                    hint_seen = True
                    break
    for key, entry in entries.items():  # an answer for the identity: its session goes on
        if entry.session and entry.expires_at < now + SESSION_ENTRY_S:
            entries[key] = replace(entry, expires_at=now + SESSION_ENTRY_S)
    if hint and hint_expires_at + _unwritten_extension(hint_ttl) <= now:
        hint, hint_expires_at, hint_ttl = None, 0.0, 0.0
    if deleted:  # (most answers delete nothing)
        deleted = dict(
            sorted(
                (
                    (k, at)
                    for k, at in deleted.items()
                    if len(k.encode("utf-8", "surrogatepass")) <= MAX_DELETED_KEY_BYTES
                ),
                key=lambda pair: pair[1],
            )[-MAX_DELETIONS:]
        )
    sizes = {key: _entry_bytes(key, entry) for key, entry in entries.items()}
    if sum(sizes.values()) > MAX_STATE_BYTES:
        kept, total = {}, 0
        for key, entry in sorted(entries.items(), key=lambda pair: -pair[1].expires_at):
            if total + sizes[key] <= MAX_STATE_BYTES:
                kept[key], total = entry, total + sizes[key]
        entries = kept
    return replace(
        state, entries=entries, hint=hint, hint_expires_at=hint_expires_at, hint_ttl=hint_ttl, deleted=deleted
    )


def _extension_due(stored: float, answered: float, now: float) -> bool:
    """Whether the expiry Edge answered (`answered`) must replace the stored one: it is earlier, or it is later and
    the stored one keeps less than 1 - EXTENSION_DUE_SHARE of the new lifetime. An expiry Edge did not extend (the
    same as stored) is never due, however old it is."""
    return answered < stored or (answered > stored and stored - now < (answered - now) * (1 - EXTENSION_DUE_SHARE))


def needs_write(old: IdentityState, new: IdentityState, now: float) -> bool:
    """False when the only difference is an expiry extension that is not due yet.

    An extension is due once a tenth of an entry's (or the hint's) lifetime has passed since it was written, so a
    busy visitor costs at most one state write per tenth of the shortest lifetime (3 minutes for Edge's 30-minute
    hint) instead of one per event. The price: a stored expiry may trail Edge's by up to that tenth. The hint and the
    cluster entry, which route calls, are used that much longer (`IdentityState.route_hint`); another entry can lapse
    that much early for a visitor whose next event comes just before Edge's expiry.
    """
    old_sent = old.sendable_entries(now)
    if old_sent.keys() != new.entries.keys() or old.route_hint(now) != new.hint:
        return True
    for key, entry in new.entries.items():
        before = old_sent[key]
        if (before.value, before.attrs, before.session) != (entry.value, entry.attrs, entry.session):
            return True
        if before.max_age != entry.max_age and CLUSTER_KEY.fullmatch(key):
            return True  # its lifetime sets its grace (`_sent_until`): the stored one must be Edge's
        if _extension_due(before.expires_at, entry.expires_at, now):
            return True
    if new.hint and old.hint_lifetime() != new.hint_lifetime():
        return True  # the hint's grace is a tenth of its stored lifetime (`IdentityState.route_hint`)
    return bool(new.hint) and _extension_due(old.hint_expires_at, new.hint_expires_at, now)


def state_to_item(state: IdentityState) -> dict[str, Any]:
    """JSON-ready attributes of the identity-state item (values stay out of logs)."""
    return (
        {
            "entries": {
                k: {"value": e.value, "expiresAt": _seconds(e.expires_at), "maxAge": e.max_age}
                | ({"attrs": e.attrs} if e.attrs else {})
                | ({"session": True, "setAt": _seconds(e.set_at)} if e.session else {})
                for k, e in sorted(state.entries.items())
            },
            "hint": state.hint,
            "hintExpiresAt": _seconds(state.hint_expires_at),
        }
        | ({"hintTtl": _seconds(state.hint_ttl)} if state.hint and state.hint_ttl else {})
        | ({"deleted": {k: _seconds(t) for k, t in sorted(state.deleted.items())}} if state.deleted else {})
    )


def _entry_from_item(v: dict[str, Any]) -> StoredEntry:
    expires_at, max_age, session = float(v["expiresAt"]), int(v.get("maxAge", 0)), v.get("session") is True
    set_at = v.get("setAt")
    if not (isinstance(set_at, int | float) and not isinstance(set_at, bool) and math.isfinite(set_at)):
        set_at = expires_at - max_age if session else 0.0  # (a session entry's was not written: the latest it can be)
    return StoredEntry(str(v["value"]), expires_at, max_age, v.get("attrs") or None, session, float(set_at))


def _seconds(value: float) -> int | float:
    """A time or lifetime as stored: to the millisecond (whole seconds ended a lifetime up to 1 s before Edge did,
    and wrote a sub-second hint lifetime as 0, "not known"), as an integer when it is one. Versions that wrote whole
    seconds read either (`float()`)."""
    exact = round(value, 3)
    return int(exact) if exact == int(exact) else exact


def state_from_item(doc: dict[str, Any], version: int) -> IdentityState:
    entries = {
        k: _entry_from_item(v)
        for k, v in (doc.get("entries") or {}).items()
        if isinstance(v, dict) and "value" in v and "expiresAt" in v
    }
    deleted = doc.get("deleted")
    deleted = deleted if isinstance(deleted, dict) else {}
    hint = doc["hint"] if valid_hint(doc.get("hint")) else None
    ttl = _lifetime(doc.get("hintTtl")) if hint else None  # absent from items written before it was kept
    return IdentityState(
        entries=entries,
        hint=hint,
        hint_expires_at=float(doc.get("hintExpiresAt") or 0),
        hint_ttl=_hint_ttl(ttl) if ttl is not None else 0.0,
        version=version,
        deleted={k: float(t) for k, t in deleted.items() if _lifetime(t) is not None},
    )
