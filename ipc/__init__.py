"""Processes and messages: the RPC server and client (and, with issue 5, stage processes and IPC arenas)."""
