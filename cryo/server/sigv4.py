"""AWS Signature Version 4, verified the way botocore signs non-S3 requests.

The server recomputes the signature from the request exactly as it arrived
and compares it with the one the client sent, in constant time:

* **Canonical URI**: the raw request path (already percent-encoded on the
  wire), with empty and dot segments removed as botocore does, then
  percent-encoded once more with ``/`` and ``~`` left as they are. That is
  the "double encoding" of every AWS service but S3: an object ``a/b c``
  travels as ``a%2Fb%20c`` and is signed as ``a%252Fb%2520c``.
* **Canonical query**: every ``name=value`` pair percent-decoded (``+``
  stays a plus sign) and encoded again with only ``A-Z a-z 0-9 - _ . ~``
  left bare, sorted by name, then value. For botocore, whose query strings
  are encoded that way already, this is the query as sent.
* **Canonical headers**: the headers named in ``SignedHeaders``, in that
  order, values trimmed and inner runs of blanks collapsed, repeated headers
  joined with commas. ``host`` and ``x-amz-date`` must be signed.
* **Payload**: the value of ``X-Amz-Content-SHA256`` when the client sent
  one (``UNSIGNED-PAYLOAD`` is accepted only where the operation's model
  says ``v4-unsigned-body``), otherwise the hex SHA-256 of the body.
* **Scope**: ``<date>/<region>/backup-storage/aws4_request``; the date must
  be the one of ``X-Amz-Date``, which must be within 15 minutes of the
  server's clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from urllib.parse import quote, unquote_to_bytes

from cryo.errors import AccessDeniedException
from cryo.model import SIGNING_NAME

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_SECONDS = 15 * 60
TERMINATOR = "aws4_request"

_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_AMZ_DATE_RE = re.compile(r"^\d{8}T\d{6}Z$")
_HEADER_NAME_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_QUERY_SAFE = "-_.~"
_SINGLE_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256")


def remove_dot_segments(path: str) -> str:
    """botocore's ``remove_dot_segments``: RFC 3986 dot segments and empty segments dropped."""
    if not path:
        return ""
    out: list[str] = []
    for segment in path.split("/"):
        if segment and segment != ".":
            if segment == "..":
                if out:
                    out.pop()
            else:
                out.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


def canonical_uri(raw_path: str) -> str:
    """The canonical URI of a raw (wire) path, as botocore computes it for non-S3 services."""
    normalized = remove_dot_segments(raw_path) if raw_path else "/"
    # The request line was decoded as Latin-1: recover its bytes before quoting.
    return quote(normalized.encode("latin-1", "replace"), safe="/~")


def canonical_query(raw_query: str) -> str:
    """The canonical query string of a raw (wire) query string."""
    if not raw_query:
        return ""
    pairs = []
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        pairs.append(
            (
                quote(unquote_to_bytes(name.encode("latin-1", "replace")), safe=_QUERY_SAFE),
                quote(unquote_to_bytes(value.encode("latin-1", "replace")), safe=_QUERY_SAFE),
            )
        )
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Message, names: Sequence[str]) -> str:
    lines = []
    for name in names:
        values = headers.get_all(name)
        if not values:
            raise AccessDeniedException(f"the signed header {name!r} is missing from the request")
        lines.append(f"{name}:{','.join(_trim(str(v)) for v in values)}")
    return "\n".join(lines) + "\n"


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 ...`` header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: str
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{TERMINATOR}"

    @property
    def header_names(self) -> list[str]:
        return self.signed_headers.split(";")


def parse_authorization(value: str | None) -> Authorization:
    """Parse the Authorization header; AccessDeniedException if it is missing or malformed."""
    if not value:
        raise AccessDeniedException("the request is not signed: no Authorization header")
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AccessDeniedException(f"unsupported signature algorithm; use {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if not sep or name in fields:
            raise AccessDeniedException("malformed Authorization header")
        fields[name] = field_value.strip()
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise AccessDeniedException(
            "malformed Authorization header: expected Credential, SignedHeaders and Signature"
        )
    credential = fields["Credential"].split("/")
    if len(credential) != 5 or not credential[0] or credential[4] != TERMINATOR:
        raise AccessDeniedException(
            "malformed Authorization header: Credential must be "
            "ACCESS_KEY_ID/DATE/REGION/SERVICE/aws4_request"
        )
    signed = fields["SignedHeaders"]
    names = signed.split(";")
    if not all(_HEADER_NAME_RE.match(n) for n in names):
        raise AccessDeniedException("malformed Authorization header: bad SignedHeaders")
    signature = fields["Signature"]
    if not _HEX64_RE.match(signature):
        raise AccessDeniedException("malformed Authorization header: bad Signature")
    return Authorization(
        credential[0], credential[1], credential[2], credential[3], signed, signature
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request claims before its signature is checked."""

    authorization: Authorization
    amz_date: str
    #: ``X-Amz-Content-SHA256`` as sent (hex digest or UNSIGNED-PAYLOAD), or None.
    payload_hash: str | None


class Verifier:
    """Checks requests against a key store, for one region and signing name."""

    def __init__(
        self,
        secret_for: Callable[[str], str | None],
        region: str,
        *,
        service: str = SIGNING_NAME,
        max_skew: float = MAX_SKEW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret_for = secret_for
        self.region = region
        self.service = service
        self.max_skew = max_skew
        self._clock = clock
        # Signs for unknown keys, so they cost what a real check costs.
        self._decoy = secrets.token_hex(20)

    def claim(self, headers: Message) -> Claim:
        """Everything that can be checked before the body is read."""
        for name in _SINGLE_HEADERS:  # which copy would count is ambiguous: refuse them all
            if len(headers.get_all(name) or ()) > 1:
                raise AccessDeniedException(f"the request has more than one {name} header")
        auth = parse_authorization(headers.get("Authorization"))
        amz_date = headers.get("X-Amz-Date")
        if amz_date is None or not _AMZ_DATE_RE.match(amz_date):
            raise AccessDeniedException("X-Amz-Date is missing or not in the form YYYYMMDDTHHMMSSZ")
        try:
            d, t = amz_date[:8], amz_date[9:15]
            when = datetime(
                int(d[:4]), int(d[4:6]), int(d[6:]), int(t[:2]), int(t[2:4]), int(t[4:]), tzinfo=UTC
            )
        except ValueError:
            raise AccessDeniedException("X-Amz-Date is not a valid time") from None
        skew = abs(when.timestamp() - self._clock())
        if skew > self.max_skew:
            raise AccessDeniedException(
                f"the request time {amz_date} is {int(skew)} s away from the server's clock "
                f"(at most {int(self.max_skew)} s allowed)"
            )
        names = auth.header_names
        for required in ("host", "x-amz-date"):
            if required not in names:
                raise AccessDeniedException(f"the header {required!r} must be signed")
        if auth.date != amz_date[:8]:
            raise AccessDeniedException("the credential scope date is not the date of X-Amz-Date")
        if auth.region != self.region:
            raise AccessDeniedException(
                f"the credential scope names region {auth.region!r}; this server signs for "
                f"{self.region!r}"
            )
        if auth.service != self.service:
            raise AccessDeniedException(
                f"the credential scope names service {auth.service!r}; expected {self.service!r}"
            )
        payload = headers.get("X-Amz-Content-SHA256")
        if payload is not None and payload != UNSIGNED_PAYLOAD and not _HEX64_RE.match(payload):
            raise AccessDeniedException(
                "X-Amz-Content-SHA256 must be a lower-case hex SHA-256 or UNSIGNED-PAYLOAD"
            )
        return Claim(auth, amz_date, payload)

    def verify(
        self,
        claim: Claim,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Message,
        payload_hash: str,
    ) -> str:
        """The caller's access key id if the signature is right; AccessDeniedException if not."""
        auth = claim.authorization
        canonical = "\n".join(
            [
                method.upper(),
                canonical_uri(raw_path),
                canonical_query(raw_query),
                canonical_headers(headers, auth.header_names),
                auth.signed_headers,
                payload_hash,
            ]
        )
        to_sign = "\n".join(
            [
                ALGORITHM,
                claim.amz_date,
                auth.scope,
                hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            ]
        )
        secret = self._secret_for(auth.access_key)
        key = signing_key(secret or self._decoy, auth.date, auth.region, auth.service)
        expected = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        matches = hmac.compare_digest(expected.encode("ascii"), auth.signature.encode("ascii"))
        if secret is None:
            raise AccessDeniedException(f"unknown access key id {auth.access_key}")
        if not matches:
            raise AccessDeniedException(
                "the signature does not match: check the secret key, the region and the "
                "signing method"
            )
        return auth.access_key
