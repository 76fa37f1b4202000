"""Where start_sshd's host keys come from: generated once, a folder (Google Drive), or a Colab secret.

Every runtime should present the same host key, so a laptop's ``known_hosts`` stays valid. A folder
keeps the private keys in plain text (on Drive, file modes mean nothing); a Colab secret holds the
private key text where only the notebook's owner can read it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from . import _proc
from .errors import SshdError

HOST_KEY_TYPES = ("ed25519", "rsa")
SECRET_PREFIX = "colab-secret:"


def host_key_source(host_keys: object) -> tuple[str | None, Path | None]:
    """``(secret name, None)`` for ``"colab-secret:NAME"``, ``(None, folder)`` for a folder."""
    if host_keys is None:
        return None, None
    if not isinstance(host_keys, (str, os.PathLike)):
        raise TypeError(f"host_keys must be a folder or 'colab-secret:NAME', got {host_keys!r}")
    if isinstance(host_keys, str) and host_keys.startswith(SECRET_PREFIX):
        name = host_keys[len(SECRET_PREFIX):]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"host_keys={host_keys!r}: a Colab secret name is letters, digits "
                             "and '_', e.g. 'colab-secret:SSH_HOST_KEY'")
        return name, None
    store = Path(host_keys).expanduser()
    if store.exists() and not store.is_dir():
        raise ValueError(f"host_keys {store} exists and is not a folder")
    return None, store


PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(.*?)-----END \1PRIVATE KEY-----",
                          re.DOTALL)
KEY_KINDS = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa", "ecdsa-sha2-nistp256": "ecdsa",
              "ecdsa-sha2-nistp384": "ecdsa", "ecdsa-sha2-nistp521": "ecdsa"}


def from_secret(live: Path, name: str, keygen: str) -> list[Path]:
    """Host keys from the Colab secret ``name`` (private key text), written to ``live`` (0600)."""
    fix = (f"make a key once on your laptop: ssh-keygen -t ed25519 -N '' -C colab-host -f colab_host_key; "
           f"paste the text of colab_host_key into a Colab secret named {name} (key icon in the "
           "left sidebar) and give this notebook access to it")
    try:
        from google.colab import userdata
    except ImportError as e:
        raise SshdError(f"host_keys='{SECRET_PREFIX}{name}' reads Colab Secrets, and this is not a "
                        "Colab runtime (no google.colab.userdata)",
                        fix="pass a folder as host_keys=, or leave it out") from e
    try:
        text = userdata.get(name)
    except Exception as e:  # SecretNotFoundError, NotebookAccessError, TimeoutException, ...
        raise SshdError(f"could not read the Colab secret {name}: {type(e).__name__}: {e}",
                        fix=fix) from e
    blocks = PRIVATE_KEY.findall(text or "")
    if not blocks:
        raise SshdError(f"the Colab secret {name} holds no private key "
                        "(-----BEGIN OPENSSH PRIVATE KEY----- ...)", fix=fix)
    live.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths: list[Path] = []
    for label, body in blocks:
        # Secrets pasted into a form may lose their line breaks: rebuild the PEM lines.
        words = "".join(body.split())
        pem = "\n".join([f"-----BEGIN {label}PRIVATE KEY-----",
                         *[words[i:i + 70] for i in range(0, len(words), 70)],
                         f"-----END {label}PRIVATE KEY-----"]) + "\n"
        scratch = live / "from_secret"
        _proc.write_private(scratch, pem)
        try:
            done = _proc.run([keygen, "-y", "-P", "", "-f", str(scratch)], error=SshdError,
                             check=False)
            pub = done.stdout.strip()
            kind = KEY_KINDS.get(pub.split()[0] if pub else "")
            if done.returncode != 0 or kind is None:
                raise SshdError(f"the Colab secret {name} holds a key ssh-keygen cannot use as a "
                                "host key (a passphrase? a key type other than ed25519, ecdsa or rsa?)",
                                log_tail=done.stderr, fix=fix)
            key = live / f"ssh_host_{kind}_key"
            if key in paths:
                raise SshdError(f"the Colab secret {name} holds two {kind} keys", fix=fix)
            os.replace(scratch, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                scratch.unlink()
        _proc.write_private(Path(f"{key}.pub"), f"{' '.join(pub.split()[:2])} colab-remote-{kind}\n",
                            0o644)
        paths.append(key)
    return paths


def from_folder(live: Path, store: Path | None, keygen: str) -> list[Path]:
    """Host keys in ``live`` (0600): taken from ``store`` when it has them, generated once otherwise,
    and saved back to ``store`` so the next runtime presents the same fingerprints."""
    live.mkdir(mode=0o700, parents=True, exist_ok=True)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in HOST_KEY_TYPES:
        name = f"ssh_host_{kind}_key"
        key = live / name
        if store is not None and (store / name).is_file() and (store / f"{name}.pub").is_file():
            for suffix in ("", ".pub"):
                src, dst = store / (name + suffix), live / (name + suffix)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    _proc.write_private(dst, src.read_text(), 0o600 if not suffix else 0o644)
        if not key.exists() or not Path(str(key) + ".pub").exists():
            with contextlib.suppress(FileNotFoundError):
                key.unlink()
            bits = ["-b", "3072"] if kind == "rsa" else []
            _proc.run([keygen, "-q", "-t", kind, *bits, "-N", "", "-C", f"colab-remote-{kind}",
                       "-f", str(key)], error=SshdError, what=f"generating the {kind} host key failed")
        key.chmod(0o600)
        if store is not None:
            for suffix in ("", ".pub"):
                src, dst = live / (name + suffix), store / (name + suffix)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    _proc.write_private(dst, src.read_text(), 0o600 if not suffix else 0o644)
        paths.append(key)
    return paths
