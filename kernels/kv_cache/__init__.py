"""The paged KV-cache format and its block manager."""
