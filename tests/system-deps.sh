#!/usr/bin/env bash
# System packages the tests use: PostgreSQL (the store tests run against a
# throwaway cluster of their own), the lab's servers and clients, make and
# python3-venv. Installed with apt
# when missing and we are root; otherwise we say what is missing.
set -euo pipefail

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v make >/dev/null || need+=(make)
# The lab (tests/lab/lab.py, TOOLS): real servers and clients in namespaces.
for pair in ip:iproute2 tcpdump:tcpdump sshd:openssh-server ssh:openssh-client \
            nginx:nginx-light dnsmasq:dnsmasq-base curl:curl openssl:openssl autossh:autossh \
            ping:iputils-ping ptunnel-ng:ptunnel-ng iodine:iodine socat:socat \
            nft:nftables iptables-nft:iptables ipset:ipset conntrack:conntrack iperf3:iperf3 \
            dig:bind9-dnsutils sudo:sudo setfacl:acl; do
    tool=${pair%%:*} pkg=${pair#*:}
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || need+=("$pkg")
done
# The HTML report's test renders it in a real headless browser (tests/egress/test_report_chromium.py).
command -v chromium >/dev/null || need+=(chromium)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# pip as the task user runs it in the live incident test (the system's, not the venv's)
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)

[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "tests: missing system packages: ${need[*]} (install them, or run as root)" >&2
    [ "${CI:-}" = "true" ] && exit 1
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
