"""metadata-endpoint: a connection to a cloud instance metadata service.

The addresses are the providers' documented ones; a task has no business
reading instance credentials, so this is critical on any port.
"""

from __future__ import annotations

import functools
import ipaddress

from egress.detectors import Context, Window
from egress.records import Finding, FlowRecord, Step

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
    "fd00:ec2::254",    # AWS IPv6 (Nitro)
    "169.254.170.2",    # AWS ECS task credentials
    "169.254.170.23",   # AWS EKS Pod Identity agent
    "fd00:ec2::23",     # AWS EKS Pod Identity agent, IPv6
    "100.100.100.200",  # Alibaba Cloud
))


class MetadataEndpoint:
    name = "metadata-endpoint"
    steps = frozenset({Step.START})
    window = Window()

    def inspect(self, flow: FlowRecord, ctx: Context):
        address = _metadata(flow.dst)
        return [Finding.make("metadata-endpoint", address=address)] if address else []


@functools.lru_cache(maxsize=65536)
def _metadata(text: str) -> str | None:
    """The address in canonical form if it is a metadata service's, else None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address) if address in METADATA_ADDRESSES else None
