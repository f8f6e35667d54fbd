"""Enforcement for live tasks: nftables rulesets, the task's resolver, the sandbox."""
