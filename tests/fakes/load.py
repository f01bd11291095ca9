"""Steady traffic for tests of changes under load: N client threads, each sending one chat
request after another with no retries, counting what each phase of the test got.

    with SteadyLoad(url, key, ["tiny"], clients=20) as load:
        load.phase("rolling restart")
        ...                      # the change under test
        load.phase("after")
    load.counts["rolling restart"]  # Counts(sent=..., answered=..., failed=..., statuses=...)

A request is counted in the phase it was sent in. httpx sends each request once: nothing is
retried on the client side, so every failure the gateway let through shows.
"""

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0  # status 200
    failed: int = 0  # anything else, transport errors included
    statuses: Counter[str] = field(default_factory=Counter)
    fingerprints: Counter[str] = field(default_factory=Counter)  # system_fingerprint of 200s

    def __str__(self) -> str:
        other = {k: v for k, v in self.statuses.items() if k != "200"}
        return f"sent {self.sent}, answered 200 {self.answered}, failed {self.failed} {other or ''}"


class SteadyLoad:
    def __init__(
        self,
        url: str,
        api_key: str,
        models: list[str],
        clients: int = 8,
        body: dict[str, Any] | None = None,
        timeout: float = 120,
        pause: float = 0.0,
    ) -> None:
        """`pause`: seconds each client waits between an answer and its next request."""
        self.url = f"{url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.models = models
        self.body = body or {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        self.timeout = timeout
        self.pause = pause
        self.counts: dict[str, Counts] = {}
        self._phase = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def phase(self, name: str) -> None:
        """Requests sent from now on count under `name`."""
        with self._lock:
            self._phase = name

    @property
    def total(self) -> Counts:
        out = Counts()
        for c in self.counts.values():
            out.sent += c.sent
            out.answered += c.answered
            out.failed += c.failed
            out.statuses.update(c.statuses)
        return out

    def __enter__(self) -> "SteadyLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _client(self, index: int) -> None:
        model = self.models[index % len(self.models)]
        with httpx.Client(timeout=self.timeout, trust_env=False) as http:
            while not self._stop.is_set():
                with self._lock:
                    counts = self.counts.setdefault(self._phase, Counts())
                    counts.sent += 1
                status, fingerprint = self._send(http, model)
                with self._lock:
                    counts.statuses[status] += 1
                    if status == "200":
                        counts.answered += 1
                        counts.fingerprints[fingerprint] += 1
                    else:
                        counts.failed += 1
                self._stop.wait(self.pause)

    def _send(self, http: httpx.Client, model: str) -> tuple[str, str]:
        try:
            resp = http.post(self.url, json={**self.body, "model": model}, headers=self.headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__, ""
        if resp.status_code != 200:
            return str(resp.status_code), ""
        return "200", str(resp.json().get("system_fingerprint"))
