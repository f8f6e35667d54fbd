"""Hide secrets in command lines before they are recorded or shown.

``redact_cmdline(argv)`` returns a copy of ``argv`` where secret values became ``***`` and
the rest stays readable (the option's name, the user of a URL, the scheme of an
Authorization header), so a record still says what ran:

- the value of an option whose name says secret (``--password x``, ``--api-key=x``,
  ``-Djavax.net.ssl.keyStorePassword=x``, openssl's ``-passin pass:x``), but not of one
  naming where the secret is (``--password-file``) or a switch (``--no-password``);
- program-specific forms: mysql-like ``-pSECRET``, sshpass ``-p SECRET``, curl ``-u
  user:pass`` and ``--oauth2-bearer``;
- headers: ``Authorization: Bearer x``, ``X-Api-Key: x``, ``Cookie: x`` anywhere in an
  argument (curl -H, wget --header, git -c http.extraheader=...);
- URLs with ``user:password@``, and secret-named query parameters (``?token=x``);
- environment-style ``KEY=VALUE`` where KEY looks secret (TOKEN, SECRET, PASSWORD, KEY,
  AUTH, ...), also as ``password=x`` pairs inside a connection string or JSON;
- well-known token shapes: AWS access key ids (AKIA/ASIA...), GitHub (ghp_, github_pat_),
  OpenAI/Anthropic (sk-...), Slack (xox?-), GitLab (glpat-), Google API keys (AIza...),
  Hugging Face (hf_), npm (npm_), PyPI (pypi-), JWTs, PEM private keys; and long hex
  (32+) or base64-looking (40+, mixed case and digits) blobs.

It errs toward hiding: an option value after a secret-named option is hidden even when
that option was a switch, and a 40-hex git commit id looks like a token and is hidden.
"""

from __future__ import annotations

import os
import re

MASK = "***"

# ----------------------------------------------------------------- names

_SECRET_WORDS = {"password", "passwd", "pass", "passphrase", "pwd", "secret", "token",
                 "apikey", "auth", "authorization", "credential", "credentials", "bearer",
                 "passin", "passout", "sig", "signature", "cookie"}
_SECRET_SUFFIXES = ("password", "passwd", "passphrase", "secret", "token", "apikey")
_KEY_QUALIFIERS = {"api", "access", "secret", "private", "client", "master", "auth",
                   "encryption", "signing", "license", "session"}
_NOT_A_VALUE = {"file", "path", "dir", "fd", "env", "var", "cmd", "command", "prompt",
                "stdin", "url", "uri", "type", "method", "mode", "helper", "source", "id",
                "length", "len", "expiry", "ttl", "name"}
_SWITCH_PREFIXES = {"no", "ask", "prompt", "show", "hide", "use", "require", "allow",
                    "skip", "disable", "enable", "with", "without"}


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)     # keyStorePassword
    return [w for w in re.split(r"[^A-Za-z0-9]+", name.lower()) if w]


def secret_option(name: str) -> bool:
    """Does the option (without its dashes) hold a secret value?"""
    words = _words(name)
    if not words or words[0] in _SWITCH_PREFIXES or words[-1] in _NOT_A_VALUE:
        return False
    for i, w in enumerate(words):
        if w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES):
            return True
        if w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS:
            return True
    return False


_ENV_NOT_SECRET = {"PWD", "OLDPWD", "KEYMAP", "XKB_DEFAULT_KEYMAP", "GPG_KEY_ID",
                   "SSH_AUTH_SOCK"}


_ENV_SECRET_WORDS = {"token", "secret", "secrets", "passphrase", "pwd", "auth", "credential",
                     "credentials", "cookie", "session", "signature", "private", "apikey"}


def secret_env(key: str) -> bool:
    """Does a ``KEY=VALUE`` name look like it holds a secret? By its words (AWS_SECRET_KEY,
    apiKey, DB_PASSWORD), so that StrictHostKeyChecking or KEYMAP are left alone."""
    upper = key.upper()
    if upper in _ENV_NOT_SECRET or upper.endswith(("_FILE", "_PATH", "_DIR", "_URL_FILE")):
        return False
    words = _words(key)
    if not words or words[-1] in _NOT_A_VALUE:
        return False
    if any(w in _ENV_SECRET_WORDS or "passw" in w or w.endswith("token") for w in words):
        return True
    return words[-1] == "key" or any(
        w == "key" and i and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


# ----------------------------------------------------------------- patterns

_TOKEN_SHAPES = [
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",   # AWS key ids
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",                                  # GitHub
    r"\bgithub_pat_[A-Za-z0-9_]{30,}",
    r"\bsk-(?:[A-Za-z0-9_]+-)*[A-Za-z0-9_-]{16,}",                     # OpenAI, Anthropic
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",                               # Slack
    r"\bglpat-[A-Za-z0-9_-]{16,}",                                    # GitLab
    r"\bAIza[0-9A-Za-z_-]{30,}",                                      # Google API key
    r"\bhf_[A-Za-z0-9]{30,}",                                         # Hugging Face
    r"\bnpm_[A-Za-z0-9]{30,}",                                        # npm
    r"\bpypi-[A-Za-z0-9_-]{30,}",                                     # PyPI
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",   # JWT
]
_TOKEN = re.compile("|".join(_TOKEN_SHAPES))
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
                  re.S)
_HEX = re.compile(r"(?<![A-Za-z0-9_])[0-9a-fA-F]{32,}(?![A-Za-z0-9_])")
_DIGEST_PREFIX = re.compile(r"(?:sha\d+|md5|blake2b?|xxh\d*)[:-]$", re.I)
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}(?![A-Za-z0-9+/=_-])")
_URL_USERINFO = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)")
_HEADER = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization|\bx-[a-z0-9-]*(?:token|key|secret|auth)[a-z0-9-]*"
    r"|\bcookie|\bapi-key|\bprivate-token)\s*:\s*"
    r"(?P<scheme>(?:bearer|basic|token|digest|negotiate|ntlm|aws4-hmac-sha256|otp)\s+)?"
    r"(?P<value>\S.*)", re.I)
_PAIR = re.compile(r"(?P<key>(?<![A-Za-z0-9_.-])[A-Za-z][A-Za-z0-9_.-]*)(?P<sep>\s*=\s*)"
                   r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,\"']+)")
_JSON_PAIR = re.compile(r"\"(?P<key>[A-Za-z][A-Za-z0-9_.-]*)\"(?P<sep>\s*:\s*)"
                        r"(?P<value>\"(?:[^\"\\]|\\.)*\")")
_ENV_ARG = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$", re.S)
_OPTION_EQ = re.compile(r"^(?P<name>--?[A-Za-z][A-Za-z0-9_.:-]*)=(?P<value>.*)$", re.S)
_OPTION = re.compile(r"^--?[A-Za-z][A-Za-z0-9_.:-]*$")
_OPENSSL_PASS = re.compile(r"^(?P<pre>pass:)(?P<value>.+)$", re.S)


def _has_mixed(s: str) -> bool:
    return (any(c.isdigit() for c in s) and any(c.islower() for c in s)
            and any(c.isupper() for c in s))


def _hex(m: re.Match) -> str:
    """A long hex run is hidden unless it says it is a digest (sha256:..., md5-...)."""
    if _DIGEST_PREFIX.search(m.string[max(0, m.start() - 8):m.start()]):
        return m.group(0)
    return MASK


def _b64(m: re.Match) -> str:
    """A base64-looking blob (mixed case and digits) is hidden unless it is a path."""
    blob = m.group(0)
    if not _has_mixed(blob) or blob.startswith("/"):
        return blob
    if any(len(seg) >= 3 and seg.isalpha() and seg.islower() for seg in blob.split("/")[:-1]):
        return blob                         # a path: some/words/File2Name
    return MASK


def redact_text(text: str) -> str:
    """The secrets found inside one piece of text, whatever its position on the line."""
    if not text:
        return text
    out = _PEM.sub(MASK, text)
    out = _URL_USERINFO.sub(lambda m: m.group("pre") + MASK, out)
    out = _HEADER.sub(lambda m: f"{m.group('name')}: {m.group('scheme') or ''}{MASK}", out)
    out = _JSON_PAIR.sub(lambda m: (f'"{m.group("key")}"{m.group("sep")}"{MASK}"'
                                    if secret_option(m.group("key")) else m.group(0)), out)
    out = _PAIR.sub(lambda m: (m.group("key") + m.group("sep") + MASK
                               if secret_option(m.group("key")) else m.group(0)), out)
    out = _TOKEN.sub(MASK, out)
    out = _HEX.sub(_hex, out)
    out = _B64.sub(_b64, out)
    return out


def _userpass(value: str) -> str:
    user, sep, _secret = value.partition(":")
    return f"{user}:{MASK}" if sep else value


# ----------------------------------------------------------------- programs

_MYSQL_LIKE = {"mysql", "mysqldump", "mysqladmin", "mysqlimport", "mysqlshow", "mysqlcheck",
               "mysqlslap", "mysqlpump", "mariadb", "mariadb-dump", "mariadb-admin",
               "mariadb-import", "mariadb-check"}
_USERPASS_OPTIONS = {"curl": {"-u", "--user", "-U", "--proxy-user"},
                     "wget": {"--user", "--proxy-user"}}
_VALUE_OPTIONS = {"sshpass": {"-p"}, "curl": {"--oauth2-bearer"}, "redis-cli": {"-a"},
                  "mongo": {"-p"}, "mongosh": {"-p"}, "mongodump": {"-p"},
                  "mongorestore": {"-p"}}
_COMMANDS = (set(_USERPASS_OPTIONS) | set(_VALUE_OPTIONS) | _MYSQL_LIKE
             | {"openssl", "ssh", "scp", "sftp", "rsync", "git", "python", "python3", "bash",
                "sh", "psql", "docker", "kubectl", "aws", "gh", "npm", "pip", "sudo", "env"})
"""Program names that start a nested command line (sshpass -p x ssh -p 22 ...): the
program-specific rules that follow are that program's."""


def _program(argv: list[str]) -> str:
    return os.path.basename(argv[0]) if argv else ""


def redact_cmdline(argv: list[str] | tuple[str, ...]) -> list[str]:
    """A copy of ``argv`` with the secrets replaced by ``***``."""
    argv = list(argv)
    out: list[str] = []
    program = _program(argv)
    pending: str | None = None          # how to treat this argument: "value", "userpass"
    for i, arg in enumerate(argv):
        if pending == "value" and not arg.startswith("--"):
            out.append(MASK)
            pending = None
            continue
        pending = None if pending == "value" else pending  # the option was a switch
        if pending == "userpass":
            out.append(redact_text(_userpass(arg)))
            pending = None
            continue
        if pending == "openssl":
            m = _OPENSSL_PASS.match(arg)
            out.append(m.group("pre") + MASK if m else redact_text(arg))
            pending = None
            continue
        if i == 0 or arg == "--":
            out.append(redact_text(arg))
            if i > 0:
                # after "--", a command line of its own starts (env X=1 -- prog ...)
                program = _program(argv[i + 1:])
            continue
        if not arg.startswith("-") and os.path.basename(arg) in _COMMANDS:
            program = os.path.basename(arg)
            out.append(arg)
            continue
        prog_userpass = _USERPASS_OPTIONS.get(program, set())
        prog_value = _VALUE_OPTIONS.get(program, set())
        if program in _MYSQL_LIKE and arg.startswith("-p") and len(arg) > 2 \
                and not arg.startswith("--"):
            out.append("-p" + MASK)
            continue
        if arg in prog_userpass:
            out.append(arg)
            pending = "userpass"
            continue
        if arg in prog_value:
            out.append(arg)
            pending = "value"
            continue
        short = arg[:2]
        if len(arg) > 2 and not arg.startswith("--") and short in prog_userpass:
            out.append(short + redact_text(_userpass(arg[2:])))     # curl -uuser:pass
            continue
        if len(arg) > 2 and not arg.startswith("--") and short in prog_value:
            out.append(short + MASK)                                  # sshpass -pSECRET
            continue
        m = _OPTION_EQ.match(arg)
        if m:
            name = m.group("name")
            if name in prog_userpass:
                out.append(f"{name}={redact_text(_userpass(m.group('value')))}")
            elif secret_option(name.lstrip("-").removeprefix("D") if name.startswith("-D")
                               else name.lstrip("-")):
                out.append(f"{name}={MASK}")
            else:
                out.append(f"{name}={redact_text(m.group('value'))}")
            continue
        if _OPTION.match(arg) and secret_option(arg.lstrip("-")):
            out.append(arg)
            pending = "openssl" if program == "openssl" else "value"
            continue
        m = _ENV_ARG.match(arg)
        if m:
            value = MASK if secret_env(m.group("key")) else redact_text(m.group("value"))
            out.append(f"{m.group('key')}={value}")
            continue
        out.append(redact_text(arg))
    return out
