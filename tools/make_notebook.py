"""Writes examples/Colab_SSH.ipynb (saved without outputs). Edit here, then run this script."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# SSH into this Colab runtime, and never lose your project

This notebook uses [colab-remote](https://pypi.org/project/colab-remote/) to

1. start an **SSH server** inside this runtime (`start_sshd`),
2. dial out to **a server you own** and forward a port there back to it, so you can log in from your
   laptop or VS Code through that server (`reverse_forward`); it reconnects by itself,
3. **mirror** a project folder to that server, so nothing is lost when the runtime is recycled, and
   restore it into a fresh runtime (`mirror(..., restore=True)`).

You need a server with a public address that you can `ssh` into (a VPS, a machine at home with a
forwarded port, or a Compute Engine VM: see the end of this notebook).

> **Colab's terms:** Colab does not allow SSH and remote shells on the free tier; they are allowed
> with paid compute units (Colab Pro / Pay As You Go). Decide knowingly before you run this.

Run the cells top to bottom. Fill in the form first."""),
    new_markdown_cell("""## 1. Parameters

`SERVER` is your server as `user@host`. Leave `SERVER_PASSWORD` empty: the notebook then reads the Colab
secret `SERVER_PASSWORD` (🔑 in the left sidebar) or asks you, so the password is never saved in the
notebook. With key login to your server, put the private key's path in `SERVER_IDENTITY_FILE`.
`AUTHORIZED_KEYS` (your laptop's public key, e.g. `~/.ssh/id_ed25519.pub`) turns password login to the
runtime off.

`SERVER_HOST_KEY` pins your server's host key: its `SHA256:...` fingerprint (on the server:
`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) or its public key line. Pinning matters because every
runtime is fresh: left empty, each new runtime trusts whatever key it sees first, so someone between
the runtime and your server could pose as the server and receive your password.

`INSTALL_FROM` is what `pip install` gets: `colab-remote` from PyPI, or before a release, the repository
(`git+https://github.com/colab-remote/colab-remote`) or a wheel you uploaded
(`/content/colab_remote-0.1.0-py3-none-any.whl`). Empty skips the install.

`STOP_AT_END` stops everything in the last cell; leave it off to keep working over SSH after "run all"."""),
    new_code_cell("""INSTALL_FROM = "colab-remote"  # @param {type:"string"}
SSHD_USER = "root"  # @param {type:"string"}
SSHD_PORT = 22  # @param {type:"integer"}
SSHD_LISTEN = ""  # @param {type:"string"}
AUTHORIZED_KEYS = ""  # @param {type:"string"}
HOST_KEYS_DIR = ""  # @param {type:"string"}
SERVER = "you@your-server.example.org"  # @param {type:"string"}
SERVER_PORT = 22  # @param {type:"integer"}
SERVER_PASSWORD = ""  # @param {type:"string"}
SERVER_IDENTITY_FILE = ""  # @param {type:"string"}
SERVER_HOST_KEY = ""  # @param {type:"string"}
VIA = "ssh"  # @param ["ssh", "gcloud"]
GCE_ZONE = ""  # @param {type:"string"}
GCE_PROJECT = ""  # @param {type:"string"}
REMOTE_PORT = 20022  # @param {type:"integer"}
PROJECT_DIR = "/content/project"  # @param {type:"string"}
BACKUP_DIR = "backup/project"  # @param {type:"string"}
STATE_DIR = "~/.colab_remote"  # @param {type:"string"}
STOP_AT_END = False  # @param {type:"boolean"}""", metadata={"tags": ["parameters"]}),
    new_markdown_cell("""## 2. Install colab-remote

`INSTALL_FROM`: `colab-remote` (PyPI), a git URL or a wheel's path. Skipped when it is empty (the package
is already installed)."""),
    new_code_cell("""import subprocess, sys

if INSTALL_FROM:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", INSTALL_FROM], check=True)
import colab_remote

print("colab-remote", colab_remote.__version__)"""),
    new_markdown_cell("""## 3. Start the SSH server in this runtime

Installs openssh-server if it is missing, writes its own config (the system's `/etc/ssh/sshd_config`
is not touched), generates a strong password (or uses your public key) and prints it with the host key
fingerprints; re-running this cell keeps the password. SSH sessions see this notebook's environment
(`nvidia-smi`, CUDA, `PATH`) as it is now; after setting more variables, run
`colab_remote.refresh_environment()`.
`HOST_KEYS_DIR` keeps the same host key across runtimes, so your `known_hosts` stays valid. Best:
`colab-secret:SSH_HOST_KEY`, a Colab secret holding a private key made once with
`ssh-keygen -t ed25519 -N '' -f colab_host_key`. A folder on Google Drive (e.g.
`/content/drive/MyDrive/colab-ssh-keys`) works too, but holds the private keys in plain text: anyone
who can read that folder can pose as this runtime."""),
    new_code_cell("""from colab_remote import start_sshd

sshd = start_sshd(
    SSHD_PORT,
    user=SSHD_USER,
    authorized_keys=AUTHORIZED_KEYS or None,
    state_dir=STATE_DIR,
    host_keys=HOST_KEYS_DIR or None,
    listen_address=SSHD_LISTEN or None,
)"""),
    new_markdown_cell("""## 4. Dial out to your server

The runtime connects to `SERVER` and forwards its port `REMOTE_PORT` back to the runtime's SSH server.
The tunnel runs in the background, outlives this cell and a kernel restart, and reconnects by itself
(after a network hiccup, a server reboot, a dead link). With `SERVER_HOST_KEY` the server's key is checked
against it; without, this runtime's first connection records the key and later ones check it.

**Your password is used once.** The first login installs, on your server, a key for this tunnel alone
(it may keep `REMOTE_PORT` forwarded and do nothing else: no shell, no other port) and, in section 5, one
for the mirror alone (it may only write into `BACKUP_DIR`, through a trash, and read it back). Both expire
after 3 days. The runtime keeps those keys, never the password: whatever else runs here can do no more on
your server. `colab_remote.revoke()` takes the keys back."""),
    new_code_cell("""import getpass

def server_password():
    if SERVER_PASSWORD or SERVER_IDENTITY_FILE:
        return SERVER_PASSWORD or None
    try:
        from google.colab import userdata  # Colab Secrets
        return userdata.get("SERVER_PASSWORD")
    except Exception:
        pass
    return getpass.getpass(f"password for {SERVER}: ") or None

password = server_password()
host_key = (SERVER_HOST_KEY or None) if VIA == "ssh" else None  # gcloud pins the VM's key itself"""),
    new_code_cell("""from colab_remote import reverse_forward

tunnel = reverse_forward(
    SERVER,
    port=SERVER_PORT,
    remote_port=REMOTE_PORT,
    password=password,
    identity_file=SERVER_IDENTITY_FILE or None,
    via=VIA,
    zone=GCE_ZONE or None,
    project=GCE_PROJECT or None,
    state_dir=STATE_DIR,
    host_key=host_key,
)"""),
    new_markdown_cell("""### Connect from your laptop

```
ssh -J you@your-server -p 20022 root@localhost
```

(the exact command is printed above as `tunnel.connection_string`). For **VS Code Remote-SSH**, paste
the block below into `~/.ssh/config` and connect to the host `colab`; the lines after it go into
`~/.ssh/known_hosts`, so your laptop checks this runtime's key from the first login."""),
    new_code_cell("""print(tunnel.ssh_config(alias="colab"))
print(tunnel.known_hosts(alias="colab"))"""),
    new_markdown_cell("""## 5. Keep the project safe

`mirror()` first restores the server's copy into `PROJECT_DIR` (a fresh runtime resumes where the last one
stopped; newer local files are kept), then pushes every change to `SERVER:BACKUP_DIR` within milliseconds.
Files it deletes or overwrites on the server go to a `.colab-remote-trash` folder there, so nothing is
lost. `.git` is mirrored too."""),
    new_code_cell("""import os
from colab_remote import mirror

os.makedirs(PROJECT_DIR, exist_ok=True)
backup = mirror(
    PROJECT_DIR,
    f"{SERVER}:{BACKUP_DIR}",
    port=SERVER_PORT,
    password=password,
    identity_file=SERVER_IDENTITY_FILE or None,
    state_dir=STATE_DIR,
    host_key=host_key,
    restore=True,
)
with open(os.path.join(PROJECT_DIR, "hello-from-colab.txt"), "w") as f:
    f.write("written in the notebook\\n")
backup.flush(timeout=30)
password = None  # both keys are installed (a re-run of these cells reuses them): the password is done
backup"""),
    new_markdown_cell("""## 6. Check the whole path

Logs in the way your laptop will (through the server and the tunnel into this runtime) and runs
`nvidia-smi` when there is a GPU, else `hostname`."""),
    new_code_cell("""colab_remote.self_check(sshd, tunnel)"""),
    new_markdown_cell("""## 7. Status

Everything running from `STATE_DIR`, also after a kernel restart. `colab_remote.stop_all()` stops it;
each handle's `.logs()` shows its log."""),
    new_code_cell("""colab_remote.status(STATE_DIR)"""),
    new_markdown_cell("""## 8. Stop

Runs only when `STOP_AT_END` is set (it is off by default: after "run all" the SSH server, the tunnel and
the mirror keep running, so you can keep working over SSH). To stop everything later, run
`colab_remote.stop_all(STATE_DIR)`."""),
    new_code_cell("""if STOP_AT_END:
    backup.stop(flush=True)
    colab_remote.stop_all(STATE_DIR)"""),
    new_markdown_cell("""## Using a Compute Engine VM as the server

No server of your own? Create a small VM with an external IP, then in this notebook:

```python
from colab_remote import gcloud_setup
gcloud_setup(project="my-project", zone="us-central1-a", account="me@example.com")
!gcloud auth login
```

and set `VIA = "gcloud"`, `SERVER = "you@instance-name"`, `GCE_ZONE`, `GCE_PROJECT` in the form. The
tunnel then runs through `gcloud compute ssh` (which manages the SSH key for you) and the connection string
names the VM's external address."""),
]

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": []},
})
out = Path(__file__).resolve().parent.parent / "examples" / "Colab_SSH.ipynb"
nbformat.write(nb, out)
print("wrote", out)
