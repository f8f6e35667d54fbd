"""metadata-endpoint: a connection to a cloud instance metadata service.

The addresses are the providers' documented ones; a task has no business
reading instance credentials, so this is critical on any port.
"""

from __future__ import annotations

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
        try:
            address = ipaddress.ip_address(flow.dst)
        except ValueError:
            return []
        if address in METADATA_ADDRESSES:
            return [Finding.make("metadata-endpoint", address=str(address))]
        return []
