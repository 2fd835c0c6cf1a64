"""API keys (compared in constant time) and per-key rate limits (token buckets)."""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass, field

from qwenkit.server.errors import APIError


def check_api_key(authorization: str | None, keys: list[str]) -> str:
    """The caller's key (or "anonymous" when the server has none); 401 otherwise."""
    if not keys:
        return "anonymous"
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1): "bearer" works too
        # Compare against every key, always, so the time taken does not reveal which prefix matched.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
        if any(matches):
            return keys[matches.index(True)]
    raise APIError(401, "Incorrect API key provided.", "invalid_api_key")


@dataclass
class Bucket:
    capacity: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / 60.0)
        self.updated = now


class RateLimiter:
    """Requests and tokens per minute, per API key; 0 disables a limit."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.requests: dict[str, Bucket] = {}
        self.tokens: dict[str, Bucket] = {}
        self.lock = threading.Lock()

    def _take(self, buckets: dict[str, Bucket], key: str, capacity: int, amount: float, what: str) -> None:
        now = time.monotonic()
        bucket = buckets.setdefault(key, Bucket(capacity, capacity, now))
        bucket.refill(now)
        if bucket.tokens < amount:
            wait = math.ceil((amount - bucket.tokens) * 60.0 / capacity) if amount <= capacity else 60
            raise APIError(429, f"Rate limit reached for {what} per minute ({capacity}). Retry in {wait} s.",
                           "rate_limit_exceeded", headers={"Retry-After": str(wait)})
        bucket.tokens -= amount

    def take_request(self, key: str) -> None:
        """One request, counted when it arrives (every authenticated request, valid or not)."""
        if self.rpm:
            with self.lock:
                self._take(self.requests, key, self.rpm, 1, "requests")

    def take_tokens(self, key: str, prompt_tokens: int) -> None:
        """A prompt's tokens, counted once it has been tokenized (before the engine judges it)."""
        if self.tpm:
            with self.lock:
                self._take(self.tokens, key, self.tpm, prompt_tokens, "tokens")

    def charge(self, key: str, completion_tokens: int) -> None:
        """Generated tokens count against the next requests (they are known only afterwards)."""
        if not self.tpm:
            return
        with self.lock:
            bucket = self.tokens.setdefault(key, Bucket(self.tpm, self.tpm))
            bucket.refill(time.monotonic())
            bucket.tokens -= completion_tokens
