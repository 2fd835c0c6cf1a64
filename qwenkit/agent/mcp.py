"""Tools served by an MCP server (through the `mcp` package): the server runs as a subprocess
(stdio) or is reached by URL (streamable HTTP); its tools become agent Tools whose calls go to
the server. The MCP session lives on its own event loop in a background thread, so the agent's
tool threads call into it synchronously."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from qwenkit.agent.tools import Tool
from qwenkit.errors import QwenkitError


class MCPTools:
    """`with MCPTools(command=[...]) as tools: agent.add_tools(tools.tools)`."""

    def __init__(self, command: list[str] | None = None, url: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60.0):
        if (command is None) == (url is None):
            raise QwenkitError("give an MCP server as a command to run or as a URL, one of the two")
        self.command, self.url, self.env, self.timeout = command, url, env, timeout
        self.tools: list[Tool] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenkit-mcp", daemon=True)
        self._client = None
        self._closed: asyncio.Event | None = None
        self._done: asyncio.Future | None = None

    def __enter__(self) -> "MCPTools":
        self._thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        try:
            self.tools = ready.result(self.timeout)
        except Exception as exc:
            self.close()
            raise QwenkitError(f"cannot start the MCP server {self.command or self.url}: {type(exc).__name__}: {exc}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _open(self) -> list[Tool]:
        from mcp import Client, StdioServerParameters

        target = StdioServerParameters(command=self.command[0], args=self.command[1:], env=self.env) if self.command else self.url
        started: asyncio.Future = self._loop.create_future()
        self._closed = asyncio.Event()

        async def hold():  # the client's context must open and close in the same task
            try:
                async with Client(target) as client:
                    self._client = client
                    listed = await client.list_tools()
                    started.set_result(listed.tools)
                    await self._closed.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        self._done = asyncio.ensure_future(hold())
        listed = await started
        return [self._tool(t) for t in listed]

    def _tool(self, spec) -> Tool:
        schema = getattr(spec, "input_schema", None) or getattr(spec, "inputSchema", None) or {"type": "object", "properties": {}}

        def call(**arguments: Any) -> Any:
            future = asyncio.run_coroutine_threadsafe(self._client.call_tool(spec.name, arguments), self._loop)
            return _result_content(future.result(self.timeout))

        return Tool(spec.name, spec.description or "", dict(schema), call)

    def close(self) -> None:
        if self._closed is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._closed.set)
            if self._done is not None:
                try:
                    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(self._done), 10), self._loop).result(15)
                except Exception:
                    pass  # the server process is gone either way
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def _result_content(result) -> Any:
    texts = [getattr(c, "text", None) for c in getattr(result, "content", []) or []]
    text = "\n".join(t for t in texts if t is not None)
    if getattr(result, "is_error", False) or getattr(result, "isError", False):
        raise RuntimeError(text or "the MCP tool reported an error")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    return text if text else structured
