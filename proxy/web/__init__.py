"""The only package that imports aiohttp.web: apps, handlers, forwarding, admin."""
