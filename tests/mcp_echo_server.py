"""A small MCP server for the agent tests, run as a subprocess over stdio."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("qwenkit-test")


@server.tool()
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


if __name__ == "__main__":
    server.run("stdio")
