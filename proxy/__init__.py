"""rbac-proxy: a sidecar reverse proxy enforcing role-based access control."""

__version__ = "0.1.0"
