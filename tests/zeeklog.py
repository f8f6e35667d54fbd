"""A strict reader of Zeek's ASCII logs, by Zeek's own rules, for tests of our conn.log.

The header: ``#separator`` (written as ``\\xNN``), then ``#set_separator``,
``#empty_field``, ``#unset_field``, ``#path``, ``#open``, ``#fields`` and
``#types``; data lines; ``#close``. Every data line has as many values as
``#fields`` names, and each parses as its ``#types`` type (Zeek's
threading/formatters/Ascii.cc ParseValue): ``-`` is unset, ``(empty)`` an
empty string or set, ``\\xNN`` an escaped byte.
"""

from __future__ import annotations

import ipaddress
import re
import time

STAMP = "%Y-%m-%d-%H-%M-%S"
HEADER = ("#set_separator", "#empty_field", "#unset_field", "#path", "#open", "#fields",
          "#types")
ENUMS = {"enum": {"tcp", "udp", "icmp", "unknown_transport"}}
UNSET = object()


class ZeekLogError(AssertionError):
    pass


def unescape(text: str) -> str:
    """Zeek's get_unescaped_string: each \\xNN is the byte NN."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _number(text: str, kind: str):
    if kind in ("count", "port"):
        if not text.isdigit():
            raise ZeekLogError(f"{text!r} is not a {kind}")
        value = int(text)
        if kind == "port" and value > 65535:
            raise ZeekLogError(f"{text!r} is not a port")
        if value >= 2 ** 64:
            raise ZeekLogError(f"{text!r} does not fit a count")
        return value
    if not re.fullmatch(r"\d+\.\d{6}", text):  # Zeek renders time and interval with %.6f
        raise ZeekLogError(f"{text!r} is not a {kind} as Zeek writes it")
    return float(text)


def parse_value(text: str, kind: str, sep: dict):
    if text == sep["unset"]:
        return UNSET
    if "\t" in text or "\n" in text:
        raise ZeekLogError(f"{text!r}: an unescaped tab or newline")
    if kind in ("count", "port", "time", "interval"):
        return _number(text, kind)
    if kind == "bool":
        if text not in ("T", "F"):
            raise ZeekLogError(f"{text!r} is not a bool (T or F)")
        return text == "T"
    if kind == "addr":
        return ipaddress.ip_address(unescape(text))
    if kind in ("string", "enum"):
        value = "" if text == sep["empty"] else unescape(text)
        if kind in ENUMS and value not in ENUMS[kind]:
            raise ZeekLogError(f"{value!r} is not a transport_proto")
        return value
    m = re.fullmatch(r"(set|vector)\[(\w+)\]", kind)
    if m:
        if text == sep["empty"]:
            return set()
        items = [parse_value(item, m.group(2), sep) for item in text.split(sep["set"])]
        return set(items) if m.group(1) == "set" else items
    raise ZeekLogError(f"type {kind!r} is not one this reader knows")


def read(text: str, path: str = "conn") -> tuple[dict, list[dict]]:
    """The header (name -> value) and the rows (field -> parsed value) of one log."""
    if not text.endswith("\n"):
        raise ZeekLogError("the log does not end with a newline")
    lines = text[:-1].split("\n")
    first = lines[0]
    m = re.fullmatch(r"#separator \\x([0-9a-f]{2})", first)
    if not m:
        raise ZeekLogError(f"first line {first!r} is not '#separator \\xNN'")
    tab = chr(int(m.group(1), 16))
    header: dict = {"separator": tab}
    for line, name in zip(lines[1:], HEADER):
        key, _, value = line.partition(tab)
        if key != name:
            raise ZeekLogError(f"expected {name}, found {line!r}")
        header[name[1:]] = value.split(tab) if name in ("#fields", "#types") else value
    if header["path"] != path:
        raise ZeekLogError(f"#path is {header['path']!r}, not {path!r}")
    time.strptime(header["open"], STAMP)
    if len(header["fields"]) != len(header["types"]):
        raise ZeekLogError(f"{len(header['fields'])} #fields but {len(header['types'])} #types")
    close, _, stamp = lines[-1].partition(tab)
    if close != "#close":
        raise ZeekLogError(f"last line {lines[-1]!r} is not #close")
    time.strptime(stamp, STAMP)
    sep = {"set": unescape(header["set_separator"]), "empty": header["empty_field"],
           "unset": header["unset_field"]}
    rows = []
    for number, line in enumerate(lines[1 + len(HEADER):-1], 1 + len(HEADER) + 1):
        if line.startswith("#"):
            raise ZeekLogError(f"line {number}: a header line among the data: {line!r}")
        values = line.split(tab)
        if len(values) != len(header["fields"]):
            raise ZeekLogError(f"line {number}: {len(values)} values for "
                               f"{len(header['fields'])} fields")
        try:
            rows.append({name: parse_value(v, kind, sep) for name, kind, v
                         in zip(header["fields"], header["types"], values)})
        except (ZeekLogError, ValueError) as e:
            raise ZeekLogError(f"line {number}: {e}") from None
    return header, rows
