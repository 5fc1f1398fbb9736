"""Root error of the shared package; each service has its own root error as well."""


class BillyToolsError(Exception):
    """Root of every error raised by billy-tools' shared code."""


class ToolSpecError(BillyToolsError):
    """A ToolSpec file failed to load; the message names the file and the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class UnknownToolError(BillyToolsError):
    """No ToolSpec of that name is loaded."""

    def __init__(self, tool: str) -> None:
        super().__init__(f"unknown tool {tool!r}")
        self.tool = tool


class WireError(BillyToolsError):
    """A message on the wire could not be decoded."""


class LedgerError(BillyToolsError):
    """The run ledger refused an update."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(f"run {run_id}: {message}")
        self.run_id = run_id
