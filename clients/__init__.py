"""Python clients of featureserve: one channel core with sync and asyncio entry points."""

from clients.channel import ClientConfig

__all__ = ["ClientConfig"]
