"""Common code of billy-tools: the wire contract, ToolSpec, settings, the run ledger and
run events, shared by the admission, executor and artifacts services, the client and
the CLI."""
