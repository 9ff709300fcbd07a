"""lbwatch: one agent per load-balancer node that keeps keepalived and HAProxy in step."""

__version__ = "0.1.0"
