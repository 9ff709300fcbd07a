"""The optional HTTP health probe of haproxy (a ``monitor-uri`` or the stats page), so that a
hung haproxy counts as down. One probe is one blocking GET on a worker thread; the fall/rise
counting is policy (``policy._apply_probe``), not here.

requests (with urllib3 and ssl, about 7 MiB of resident memory) is imported only when a probe is
configured, so an agent without one stays smaller.
"""

from __future__ import annotations

from lbwatch.config import Health
from lbwatch.events import ProbeResult


class Prober:
    def __init__(self, cfg: Health) -> None:
        import requests

        self.requests = requests
        self.cfg = cfg
        self.session = requests.Session()
        # The probe targets this host; an http_proxy in the environment must not capture it.
        self.session.trust_env = False

    def probe(self) -> ProbeResult:
        requests = self.requests
        try:
            resp = self.session.get(self.cfg.url, timeout=self.cfg.timeout, allow_redirects=False)
        except requests.Timeout:
            return ProbeResult(
                False, f"GET {self.cfg.url}: no answer within {self.cfg.timeout:g} s"
            )
        except requests.ConnectionError:
            return ProbeResult(False, f"GET {self.cfg.url}: connection failed")
        except requests.RequestException as exc:
            return ProbeResult(False, f"GET {self.cfg.url}: {type(exc).__name__}")
        ok = 200 <= resp.status_code < 300
        resp.close()
        return ProbeResult(ok, f"GET {self.cfg.url}: HTTP {resp.status_code}")

    def close(self) -> None:
        self.session.close()
