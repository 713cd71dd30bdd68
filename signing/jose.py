"""What both sides agree on before any key is involved: the JWS algorithms and base64url.

`ALGORITHMS` is the one list of what this package signs with and verifies: the key ring, the
minter, the JWKS parser and the verifier all draw from it. base64url is spelled as JOSE requires
(RFC 7515, section 2): the URL-safe alphabet without padding, and on decoding only the canonical
spelling of a value is accepted.
"""

from __future__ import annotations

import base64
import re
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["ALGORITHMS", "PublicKey", "b64url_decode", "b64url_encode"]

# Each pinned to one key type: EdDSA to OKP/Ed25519, ES256 to EC/P-256, RS256 to RSA.
ALGORITHMS: Final = ("EdDSA", "ES256", "RS256")

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_ALPHABET: Final = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """base64url of `data`, without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes | None:
    """The bytes `text` spells in canonical unpadded base64url, or None if it is not that.

    Decoders skip stray characters, accept padding and ignore the spare bits of the last
    character, so without these checks many different strings would decode to the same bytes
    (and, in a token, verify as the same token).
    """
    if _ALPHABET.fullmatch(text) is None or len(text) % 4 == 1:
        return None
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:
        return None
    return raw
