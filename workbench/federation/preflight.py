"""A site's checks before it joins: TLS names, its key, and the Flower version.

:func:`preflight` fails early, with the fix in the message, on the three mistakes
that otherwise show up as a SuperNode retrying forever: a server certificate
not valid for the address the site uses, a key pair that is not the one the
coordinator registered, and a Flower version other than the coordinator's.
Whether the SuperLink accepts the key is then checked by starting the SuperNode
(:meth:`~workbench.federation.deployment.SiteNode.start` waits for its node id).
"""

from __future__ import annotations

from typing import Any

from workbench.errors import ConfigurationError
from workbench.federation.certs import (
    SiteKeys,
    check_server_certificate,
    key_fingerprint,
    public_key_of,
)

__all__ = ["preflight"]


def preflight(keys: SiteKeys, bundle: dict[str, Any], superlink: str) -> dict[str, Any]:
    """Check TLS names, the site's key and the Flower version; return what was seen.

    Raises
    ------
    ConfigurationError
        When a check fails; the message names the fix.
    """
    import flwr

    host, _, port_text = superlink.rpartition(":")
    if not host or not port_text.isdigit():
        raise ConfigurationError(
            f"--superlink {superlink!r} is not HOST:PORT, such as 127.0.0.1:9092"
        )
    host = host.strip("[]")

    # 1. The Flower version must equal the coordinator's.
    expected = bundle.get("flwr_version")
    if expected and expected != flwr.__version__:
        raise ConfigurationError(
            f"this site has Flower {flwr.__version__}, the coordinator issued the"
            f" certificates with {expected}; install flwr=={expected}"
        )

    # 2. The private key must be the pair of the registered public key.
    derived = public_key_of(keys.private_key)
    registered = keys.public_key.read_text(encoding="ascii")
    if key_fingerprint(derived) != key_fingerprint(registered) or (
        bundle.get("fingerprint")
        and key_fingerprint(registered) != bundle["fingerprint"]
    ):
        raise ConfigurationError(
            f"the private key {keys.private_key} is not the pair of the public key the"
            " coordinator registered; use the folder `workbench federation certs`"
            " wrote for this site, unchanged"
        )

    # 3. The SuperLink's certificate must be valid for the name used to reach it.
    certificate = check_server_certificate(keys.ca, host, int(port_text))
    return {
        "flwr_version": flwr.__version__,
        "key_fingerprint": key_fingerprint(registered),
        "superlink": superlink,
        "certificate_names": certificate["subject_alt_names"],
        "certificate_expires": certificate["not_after"],
    }
