"""Purposes for store tests, parsed from manifest text like real ones."""

from tagging.manifest import parse


def make_purpose(text: str = "Upgrade numpy", *, host: str = "pypi.org", mode: str = "audit"):
    return parse(f'version = 1\npurpose = "{text}"\nmode = "{mode}"\n'
                 f'waive = ["direct-ip"]\n[limits]\nconnections = 50\n'
                 f'[[allow]]\nhost = "{host}"\n[[allow]]\ncidr = "198.51.100.0/24"\n'
                 f'ports = [22, "8000-8080"]\n')
