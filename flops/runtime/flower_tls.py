"""TLS and SuperNode authentication between an aggregator's SuperLink and its learners' SuperNodes.

One rule, no development/production fork: Flower talks TLS when the node has certificates configured
(``FLOPS_TLS_CA_FILE`` / ``FLOPS_TLS_CERT_FILE`` / ``FLOPS_TLS_KEY_FILE``), and ``--insecure`` (plaintext,
anyone may join) only when it has none. Flower 1.42 ties SuperNode authentication to TLS, so both switch
together.

How a SuperNode is authenticated (Flower 1.42's CLI-managed mode; the older ``--auth-list-public-keys``
CSV is gone, and without ``--enable-supernode-auth`` a SuperLink lets any SuperNode register itself):

1. The learner generates a fresh EC key pair (P-384, OpenSSH format, its work directory) for the project
   and reports the public key in ``learner.ready``.
2. The manager already waits for every chosen learner's ``learner.ready`` before it starts the aggregator;
   it passes the public keys of exactly those learners in the ``run_aggregator`` spec.
3. The aggregator starts ``flower-superlink --enable-supernode-auth`` with the node's certificate and
   registers each key through the Control API (``flwr supernode register``) before it reports
   ``aggregator.started``. Self-registration over the Fleet API is refused in this mode, so a SuperNode
   whose key was not registered cannot activate.
4. The learner's SuperNode dials with ``--root-certificates`` (the fleet CA) and
   ``--auth-supernode-private-key``; every Fleet request carries a timestamp signed with that key. A
   SuperNode that comes up before its key is registered is refused activation; the learner starts it
   again until its connect timeout.

Why this flow: it rides on the reports and commands FLOps already has (no new topic, no message from the
aggregator to the learners), keys never leave the project's work directories except as public keys, and
the SuperLink learns them before the learners can be counted in a round.

The certificate must name every address the SuperLink is dialled at: the agent's host (learners) and
127.0.0.1 (the aggregator's own ``flwr`` CLI and Flower's SuperExec).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "ServerTls",
    "client_context",
    "new_supernode_key",
    "superlink_args",
    "supernode_args",
]

PRIVATE_KEY_FILE = "supernode_key"
PUBLIC_KEY_FILE = "supernode_key.pub"


class ServerTls:
    """The node's server certificate, its key and the fleet CA (all three or none: checked here)."""

    def __init__(self, ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
        given = [f for f in (ca_file, cert_file, key_file) if f is not None]
        if given and len(given) != 3:
            raise ValueError("TLS needs the CA file, the certificate and its key together")
        for path in given:
            if not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


def superlink_args(tls: ServerTls) -> list[str]:
    """``flower-superlink`` flags: TLS with SuperNode authentication, or ``--insecure`` without certificates."""
    if not tls.enabled:
        return ["--insecure"]
    return [
        "--ssl-ca-certfile",
        str(tls.ca_file),
        "--ssl-certfile",
        str(tls.cert_file),
        "--ssl-keyfile",
        str(tls.key_file),
        "--enable-supernode-auth",
    ]


def supernode_args(ca_file: Path | None, private_key: Path | None) -> list[str]:
    """``flower-supernode`` flags: verify the SuperLink with ``ca_file`` and sign with ``private_key``."""
    if ca_file is None:
        return ["--insecure"]
    return [
        "--root-certificates",
        str(ca_file),
        *(["--auth-supernode-private-key", str(private_key)] if private_key is not None else []),
    ]


def client_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """An SSL context that trusts only ``ca_file`` (None: plaintext)."""
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None


def new_supernode_key(directory: Path) -> tuple[Path, str]:
    """Write a fresh P-384 key pair (OpenSSH format, private key mode 0600) to ``directory``.

    Returns the private key's path and the public key line (``ecdsa-sha2-nistp384 AAAA...``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / PRIVATE_KEY_FILE
    private.unlink(missing_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (directory / PUBLIC_KEY_FILE).write_bytes(public + b"\n")
    return private, public.decode("ascii")
