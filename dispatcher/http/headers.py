"""The headers of one attempt: what a subscriber checks before it trusts a webhook.

Every attempt gets them anew (`webhook-timestamp` is the attempt's own time, the agent token's
`jti` is unique per attempt): the webhook id, the timestamp, the batch size for a batch, the
agent token (`auth` jwt, jwt+hmac) and the Standard Webhooks signature (`auth` hmac, jwt+hmac).
"""

from __future__ import annotations

from collections.abc import Callable

from dispatcher.clock import SYSTEM_CLOCK, Clock
from dispatcher.config import ALL_ACCOUNTS, SubscriberConfig
from dispatcher.names import WEBHOOK_BATCH_SIZE, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP
from signing import TokenMinter, sign_hmac

__all__ = ["RequestHeaders"]


class RequestHeaders:
    """Builds an attempt's headers for a subscriber, with the process's token minter.

    ``observe_mint`` is told how long each token took to mint (seconds).
    """

    def __init__(
        self,
        minter: TokenMinter | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        observe_mint: Callable[[float], None] | None = None,
    ) -> None:
        self._minter = minter
        self._wall = clock.wall  # the timestamp (and the token's iat)
        self._elapsed = clock.elapsed  # how long a token took
        self._observe_mint = observe_mint

    def build(
        self, sub: SubscriberConfig, webhook_id: str, body: bytes, batch_size: int | None = None
    ) -> dict[str, str]:
        ts = int(self._wall())
        headers = {
            "Content-Type": "application/json",
            WEBHOOK_ID: webhook_id,
            WEBHOOK_TIMESTAMP: str(ts),
        }
        if batch_size is not None:
            headers[WEBHOOK_BATCH_SIZE] = str(batch_size)
        if sub.uses_jwt and self._minter is not None:
            started = self._elapsed()
            token = self._minter.mint(
                audience=sub.url,
                webhook_id=webhook_id,
                body=body,
                now=ts,
                account=None if sub.account == ALL_ACCOUNTS else sub.account,
                algorithm=sub.algorithm,
            )
            if self._observe_mint is not None:
                self._observe_mint(self._elapsed() - started)
            headers["Authorization"] = f"Bearer {token}"
        if sub.uses_hmac:
            headers[WEBHOOK_SIGNATURE] = sign_hmac(sub.hmac_secrets, webhook_id, ts, body)
        return headers
