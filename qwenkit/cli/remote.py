"""Talk to a running qwenkit (or any OpenAI-compatible) server: `qwenkit chat --url ...`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from qwenkit.errors import QwenkitError


class RemoteChat:
    def __init__(self, url: str, api_key: str | None, model: str | None, params: dict):
        self.base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.params = {k: v for k, v in params.items() if v is not None}

    def stream(self, messages: list[dict]) -> Iterator[str]:
        body = {"messages": messages, "stream": True, **self.params}
        if self.model:
            body["model"] = self.model
        try:
            with httpx.stream("POST", f"{self.base}/chat/completions", json=body, headers=self.headers, timeout=None) as r:
                if r.status_code != 200:
                    r.read()
                    try:
                        message = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = r.text[:200]
                    raise QwenkitError(f"the server answered {r.status_code}: {message}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:  # the server's generation failed mid-stream
                        raise QwenkitError(f"the server reported: {event['error'].get('message')}")
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise QwenkitError(f"cannot reach {self.base}: {exc}") from exc
