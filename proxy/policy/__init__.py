"""The pure policy core: no I/O, no asyncio, no aiohttp, yaml or prometheus."""
